-- wrk script: a flood of history queries (received, sent, wallet entries) for random users,
-- run beside a claim storm to check that claims keep being served ahead of queries.
--   wrk ... -s bench/wrk-history.lua URL -- KEY
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  key = args[1]
  ok, shed, other = 0, 0, 0
  math.randomseed(os.time() * 1000 + tid * 104729)
  paths = { "/v1/users/bench-s%d/received", "/v1/users/bench-s%d/sent", "/v1/wallets/bench-s%d/entries" }
end

function request()
  local path = string.format(paths[math.random(1, #paths)], math.random(1, 500))
  return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. key })
end

function response(status, headers, body)
  if status == 200 then ok = ok + 1 elseif status == 503 then shed = shed + 1 else other = other + 1 end
end

function done(summary, latency, requests)
  local o, s, x = 0, 0, 0
  for _, t in ipairs(threads) do o = o + t:get("ok"); s = s + t:get("shed"); x = x + t:get("other") end
  local secs = summary.duration / 1e6
  io.write(string.format("history_ok_per_s=%d history_shed_per_s=%d history_other=%d\n", o / secs, s / secs, x))
end
