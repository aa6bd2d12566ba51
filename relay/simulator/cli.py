"""`python -m relay simulator` (or `python -m relay.simulator.cli`): run the APNs simulator.

Operators point a relay at it to try their configuration without sending
anything to Apple: the simulator checks topic, key id, team id and the signing
key exactly where Apple would, and logs one line per request with its answer.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

from relay.config import parse_duration, parse_listen
from relay.exits import ExitStatus
from relay.simulator.credentials import load_public_key, random_apple_id, write_signing_key
from relay.simulator.outcomes import Action, ScriptedOutcome
from relay.simulator.server import ApnsSimulator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m relay simulator",
        description="An APNs look-alike on HTTP/2 + TLS that validates requests like Apple. "
        "Prints its URL and the CA file to trust (apns.endpoint, apns.ca_file).",
    )
    parser.add_argument("--listen", default="127.0.0.1:8443", metavar="HOST:PORT",
                        help="address to listen on (default 127.0.0.1:8443; port 0 picks one)")
    parser.add_argument("--topic", required=True, help="the bundle id to accept (apns.topic)")
    key = parser.add_argument_group("provider token (the relay's apns.key_id/team_id/key_file)")
    key.add_argument("--key-id", help="10-character key id (default: random with --generate-key)")
    key.add_argument("--team-id", help="10-character team id (default: random with --generate-key)")
    source = key.add_mutually_exclusive_group()
    source.add_argument("--public-key", type=Path, metavar="FILE", help="PEM public key")
    source.add_argument("--private-key-file", type=Path, metavar="FILE",
                        help="the .p8 key itself (only its public half is used)")
    source.add_argument("--generate-key", action="store_true",
                        help="make a fresh .p8 key in the work directory and print its path")
    parser.add_argument("--client-ca", type=Path, metavar="FILE",
                        help="accept TLS client certificates from this CA (certificate auth)")
    parser.add_argument("--environment", choices=("production", "sandbox"),
                        default="production",
                        help="the APNs environment it plays; client certificates must allow "
                        "it (default production)")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="where the CA and certificate go (default: a temporary directory)")
    faults = parser.add_argument_group("behaviour and faults")
    faults.add_argument("--max-streams", type=int, default=1000, metavar="N",
                        help="SETTINGS_MAX_CONCURRENT_STREAMS (default 1000)")
    faults.add_argument("--window", type=int, default=65535, metavar="BYTES",
                        help="SETTINGS_INITIAL_WINDOW_SIZE (default 65535)")
    faults.add_argument("--latency", default="0", metavar="DURATION",
                        help="delay before every answer, e.g. 20ms (default 0)")
    faults.add_argument("--goaway-after", type=int, metavar="N",
                        help="send GOAWAY when the N-th stream of a connection arrives")
    faults.add_argument("--time-scale", type=float, default=1.0, metavar="X",
                        help="run the JWT clock X times faster than real time (default 1)")
    faults.add_argument("--script", action="append", default=[], metavar="TOKEN=OUTCOMES",
                        help="answers for a token's next requests, e.g. "
                        "abcd...=503:ServiceUnavailable,410:Unregistered,withhold (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no line per request")
    parser.add_argument("--record-limit", type=int, default=10000, metavar="N",
                        help="requests kept in memory (default 10000)")
    return parser


def parse_outcomes(text: str) -> list[ScriptedOutcome]:
    """`503:ServiceUnavailable,410:Unregistered:1700000000000,withhold,drop,reset,200`."""
    outcomes = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if parts[0] in {action.value for action in Action}:
            outcomes.append(ScriptedOutcome(action=Action(parts[0])))
            continue
        if not parts[0].isdigit() or len(parts) > 3:
            raise ValueError(f"expected STATUS[:REASON[:TIMESTAMP_MS]] or an action, got {item!r}")
        timestamp = int(parts[2]) if len(parts) == 3 else None
        outcomes.append(ScriptedOutcome(int(parts[0]), parts[1] if len(parts) > 1 else None,
                                        timestamp))
    return outcomes


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        host, port = parse_listen(args.listen)
        latency = parse_duration(args.latency)
        scripts = []
        for entry in args.script:
            token, _, outcomes = entry.partition("=")
            scripts.append((token, parse_outcomes(outcomes)))
    except ValueError as exc:
        parser.error(str(exc))
    key_id = args.key_id or (random_apple_id() if args.generate_key else None)
    team_id = args.team_id or (random_apple_id() if args.generate_key else None)
    has_key = bool(args.public_key or args.private_key_file or args.generate_key)
    if has_key and not (key_id and team_id):
        parser.error("--key-id and --team-id are required with a key")
    if not has_key and args.client_ca is None:
        parser.error("give a key (--public-key, --private-key-file or --generate-key) "
                     "or --client-ca")
    keys: dict[str, tuple[str, EllipticCurvePublicKey]] = {}
    if args.public_key or args.private_key_file:
        assert key_id and team_id
        try:
            keys[key_id] = (team_id, load_public_key(args.public_key or args.private_key_file))
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    simulator = ApnsSimulator(
        host=host, port=port, topic=args.topic, environment=args.environment, keys=keys,
        time_scale=args.time_scale,
        max_concurrent_streams=args.max_streams, initial_window_size=args.window,
        goaway_after=args.goaway_after, latency=latency, client_ca=args.client_ca,
        record_limit=args.record_limit, log_requests=not args.quiet, workdir=args.workdir,
    )
    key_file = None
    if args.generate_key:
        assert key_id and team_id
        key_file, public_key = write_signing_key(simulator.workdir, key_id)
        simulator.add_key(key_id, team_id, public_key)
    for token, outcomes in scripts:
        simulator.script(token, outcomes)
    try:
        simulator.start()
    except OSError as exc:
        print(f"simulator: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
        return ExitStatus.USAGE
    print(f"APNs simulator listening on {simulator.url}", flush=True)
    print("# relay configuration to reach it:")
    print("apns:")
    print(f"  endpoint: {simulator.url}")
    print(f"  ca_file: {simulator.ca_file}")
    print(f"  topic: {args.topic}")
    if key_id:
        print(f"  key_id: {key_id}\n  team_id: {team_id}")
    if key_file:
        print(f"  key_file: {key_file}")
    print(flush=True)  # the blank line ends the block (see `spawn`)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    simulator.stop()
    return ExitStatus.OK


def spawn(options: Sequence[str], *, cwd: Path | None = None,
          quiet_stderr: bool = False) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """This CLI in a child process (tests, benchmarks) and the `apns:` values it printed.

    The child answers SIGTERM by stopping cleanly (exit status 0).
    """
    child = subprocess.Popen(
        [sys.executable, "-m", "relay.simulator.cli", *options], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet_stderr else None, text=True, cwd=cwd)
    assert child.stdout is not None
    values: dict[str, str] = {}
    for line in child.stdout:
        if not line.strip() and "endpoint" in values:
            return child, values
        key, separator, value = line.strip().partition(": ")
        if separator:
            values[key] = value
    raise RuntimeError(f"the simulator exited with status {child.wait()} before it was ready")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
