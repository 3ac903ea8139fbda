-- wrk script for the claim endpoint: POST /v1/packets/{id}/claim by a new user each time,
-- spread over the packet ids given, every answer counted (200 paid, 410 turned away, 503
-- refused, anything else an error).
--
-- README: create packets first (hongbao-bench does it, or curl as scripts/wrk-storm does), then
--   wrk -t2 -c256 -d10s -s bench/claim.lua http://127.0.0.1:PORT -- SERVICE_KEY ID1 [ID2 ...]
-- It prints paid, turned away, refused, other, paid/s, handled/s and latency percentiles.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  ids = {}
  for i = 2, #args do ids[#ids + 1] = args[i] end
  if #ids == 0 then error("usage: wrk ... -s bench/claim.lua URL -- KEY ID1 [ID2 ...]") end
  -- Built once: only the path and the body change from request to request.
  headers = { ["Authorization"] = "Bearer " .. args[1], ["Content-Type"] = "application/json" }
  paths = {}
  for i, id in ipairs(ids) do paths[i] = "/v1/packets/" .. id .. "/claim" end
  paid, away, shed, other = 0, 0, 0, 0
  -- A user is this run, this thread and a counter: never repeated, so a 200 is always a new
  -- share (a repeated claim would answer 200 with the same share and pay nothing).
  run = string.format("%x", os.time() % 1048576)
  seq = 0
  math.randomseed(os.time() * 1000 + tid * 7919)
end

function request()
  seq = seq + 1
  local body = string.format('{"user":"k%s-%d-%d"}', run, tid, seq)
  return wrk.format("POST", paths[math.random(1, #paths)], headers, body)
end

function response(status, headers, body)
  if status == 200 then paid = paid + 1
  elseif status == 410 then away = away + 1
  elseif status == 503 then shed = shed + 1
  else other = other + 1 end
end

function done(summary, latency, requests)
  local p, a, s, o = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    p = p + t:get("paid"); a = a + t:get("away"); s = s + t:get("shed"); o = o + t:get("other")
  end
  local secs = summary.duration / 1e6
  io.write(string.format("paid=%d turned_away=%d overloaded=%d other=%d seconds=%.2f\n", p, a, s, o, secs))
  io.write(string.format("paid_per_s=%d handled_per_s=%d\n", p / secs, (p + a) / secs))
  io.write(string.format("latency_us_p50=%d latency_us_p99=%d latency_us_p999=%d latency_us_max=%d\n",
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
