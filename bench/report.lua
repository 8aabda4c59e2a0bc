-- wrk script for bench/run.py: when the run ends, print one line of JSON that
-- run.py parses, instead of scraping wrk's human-oriented text (whose units
-- change with magnitude: us, ms, s). Latencies are in microseconds.

-- mean/stdev are NaN when no request completed; JSON has no NaN.
local function finite(x)
  if x ~= x then
    return 0
  end
  return x
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"min":%d,"max":%d,"mean":%.3f,"stdev":%.3f,'
      .. '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, finite(latency.mean), finite(latency.stdev),
    latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
