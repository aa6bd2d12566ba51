-- wrk script for bench/api_registrations.py: POST /devices with a fresh random token per
-- request, then one JSON line with what the bench reads: counts, and the latency at every
-- 0.1 % quantile (microseconds), so that slices can be pooled.
local digits = "0123456789abcdef"
math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1e6))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

request = function()
  local token = {}
  for i = 1, 64 do
    local d = math.random(1, 16)
    token[i] = digits:sub(d, d)
  end
  return wrk.format(nil, nil, nil, '{"token": "' .. table.concat(token) .. '"}')
end

done = function(summary, latency, requests)
  local e = summary.errors
  local quantiles = {}
  for i = 1, 1000 do
    quantiles[i] = string.format("%d", latency:percentile(i / 10))
  end
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, ' ..
    '"quantiles_us": [%s]}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    table.concat(quantiles, ", ")))
end
