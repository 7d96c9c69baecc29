-- wrk script for scripts/bench: the request comes from the environment
-- (WRK_METHOD, WRK_BODY, WRK_AUTH for an `Authorization: Bearer` key,
-- WRK_CONTENT_TYPE), and the summary is printed as one JSON line prefixed
-- with `WRK_JSON ` for the harness to read.
local method = os.getenv("WRK_METHOD") or "GET"
local body = os.getenv("WRK_BODY")
local auth = os.getenv("WRK_AUTH")
local ctype = os.getenv("WRK_CONTENT_TYPE")

wrk.method = method
if body and body ~= "" then
  wrk.body = body
  wrk.headers["Content-Type"] = ctype or "application/json"
end
if auth and auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end

non2xx = 0
response = function(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

-- `response` runs in each thread; collect the counts in `done`.
local threads = {}
setup = function(thread)
  table.insert(threads, thread)
end

done = function(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do
    bad = bad + (t:get("non2xx") or 0)
  end
  local secs = summary.duration / 1e6
  io.write(string.format(
    'WRK_JSON {"requests":%d,"seconds":%.3f,"rps":%.1f,"p50_us":%d,"p99_us":%d,' ..
    '"mean_us":%.1f,"non2xx":%d,"errors":%d}\n',
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50), latency:percentile(99), latency.mean, bad,
    summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.status + summary.errors.timeout))
end
