-- How precise a Pool task timeout is: a task records when it started (in shared
-- memory) and hangs; the parent notes when get() raised Timeout. Lateness = raise time -
-- (start + limit). Prints median and max over N runs, and the time a replacement
-- worker takes to run the next task.
-- Usage: build/luamp scripts/bench/pool_timeout.lua [runs=100] [limit=0.05] [hang=loop|sleep]
local luamp = require "luamp"
local runs = tonumber(arg[1]) or 100
local limit = tonumber(arg[2]) or 0.05
local how = arg[3] or "loop"

local started = luamp.Value("d", 0, {lock = false})
local function hang()
  started.value = luamp.time()
  if how == "sleep" then luamp.sleep(1e9) else while true do end end
end

local pool <close> = luamp.Pool(1)
local late, next_task = {}, {}
for i = 1, runs do
  started.value = 0
  local r = pool:apply_async(hang, {}, {timeout = limit})
  local ok, err = pcall(r.get, r)
  local t = luamp.time()
  assert(not ok and err.kind == "Timeout", tostring(err))
  late[i] = t - (started.value + limit)
  pool:apply(function() end)
  next_task[i] = luamp.time() - t
end

local function stats(t)
  table.sort(t)
  return t[(#t + 1) // 2] * 1e3, t[#t] * 1e3, t[1] * 1e3
end
print(string.format("timeout %g s, %s, %d runs: raised after the limit by median %.2f ms, max %.2f ms (min %.2f ms)",
  limit, how, runs, stats(late)))
print(string.format("next task on the replacement worker: median %.2f ms, max %.2f ms", stats(next_task)))
