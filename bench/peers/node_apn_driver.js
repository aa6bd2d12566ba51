// @parse/node-apn sending N background notifications to the simulator, as its users tune
// it: one Provider (token auth), `provider.send(notification, tokens)` with 1,000 tokens at
// a time, one batch after another. The first batch holds one token: APNs (and the
// simulator) allow one stream per connection until a request's token was accepted.
//   node bench/peers/node_apn_driver.js N ENDPOINT CA_FILE KEY_FILE KEY_ID TEAM_ID TOPIC
// Prints `sent N ok M`. Installed by `python -m bench.peers` (npm install in bench/peers).
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const apn = require('@parse/node-apn');

const BATCH = 1000;

async function main() {
  const [n, endpoint, caFile, keyFile, keyId, teamId, topic] = process.argv.slice(2);
  const url = new URL(endpoint);
  const provider = new apn.Provider({
    token: { key: fs.readFileSync(keyFile), keyId, teamId },
    address: url.hostname,
    port: Number(url.port || 443),
    ca: fs.readFileSync(caFile),
    production: true,
  });
  const note = new apn.Notification();
  note.contentAvailable = 1;
  note.priority = 5;
  note.pushType = 'background';
  note.topic = topic;
  let ok = 0;
  for (let done = 0; done < Number(n);) {
    const size = done === 0 ? 1 : Math.min(BATCH, Number(n) - done);
    done += size;
    const tokens = [];
    for (let i = 0; i < size; i++) {
      tokens.push(crypto.randomBytes(32).toString('hex'));
    }
    const result = await provider.send(note, tokens);
    ok += result.sent.length;
  }
  provider.shutdown();
  console.log(`sent ${n} ok ${ok}`);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
