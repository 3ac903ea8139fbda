-- wrk script: claims from a list of packets by random users, counting what was paid.
--   wrk -t2 -c64 -d10s -s bench/wrk-claim.lua http://127.0.0.1:PORT -- KEY ID1 ID2 ...
-- Every response is counted: 200 paid, 410 turned away, anything else an error.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  key = args[1]
  ids = {}
  for i = 2, #args do ids[#ids + 1] = args[i] end
  paid, away, shed, other = 0, 0, 0, 0
  -- Each thread draws its own users: threads seeded alike would repeat each other's claims,
  -- and a repeated claim is answered (200, the same share) without paying anything new.
  math.randomseed(os.time() * 1000 + tid * 7919)
  seq = 0
end

function request()
  local id = ids[math.random(1, #ids)]
  seq = seq + 1
  local body = string.format('{"user":"w%d-%d-%d"}', tid, seq, math.random(1, 1000000))
  return wrk.format("POST", "/v1/packets/" .. id .. "/claim",
    { ["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json" }, body)
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
  io.write(string.format("latency_us_p50=%d latency_us_p99=%d latency_us_max=%d\n",
    latency:percentile(50), latency:percentile(99), latency.max))
end
