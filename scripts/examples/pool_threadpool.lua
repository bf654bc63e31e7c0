-- Port of the ThreadPool examples. Lua has no threads to share a process with, so the
-- luamp port of `multiprocessing.pool.ThreadPool` is the process Pool itself: the same
-- methods, the work on other cores. Three seeds in one script:
--   1. ThreadPool() with ten apply_async(long_time_task) calls, close, join;
--   2. the hand-made ThreadPool class (a task queue and daemon worker threads) mapping
--      wait_delay over 50 random delays and waiting for completion;
--   3. the `threadpool` library's makeRequests with a callback per finished task.
-- (Pass the longest sleep in seconds as the first argument; the seeds use 3 to 7 s.)
local luamp = require "luamp"
local longest = tonumber(arg and arg[1]) or 5

local function long_time_task(name)
  print(string.format("Running task %s (%d)", name, luamp.getpid()))
  io.stdout:flush()
  local start = luamp.time()
  luamp.sleep(math.random() * longest)
  print(string.format("Task %s run %0.2f seconds.", name, luamp.time() - start))
  return luamp.time() - start
end

-- 1. ThreadPool() with the default size
print(string.format("Parent process %d", luamp.getpid()))
print(string.format("PC has %d CPU workers", luamp.cpu_count()))
local p = luamp.Pool()
for i = 0, 9 do p:apply_async(long_time_task, {i}) end
print("wait for all subprocess done.")
p:close()
print("task start")
io.stdout:flush()
p:join()
print("All task done.")

-- 2. the hand-made pool of five: map a function over 50 delays, wait for completion
local function wait_delay(d)
  print(string.format("sleep for (%.2f)sec", d))
  io.stdout:flush()
  luamp.sleep(d)
end
local delays = {}
for i = 1, 50 do delays[i] = longest * (3 + math.random() * 4) / 70 end
do
  local pool <close> = luamp.Pool(5)
  pool:map(wait_delay, delays, 1)          -- returns once every task is done
end
print("all delays done")

-- 3. one request per name, a callback as each one finishes
local function callback(name, result)
  print(string.format("request %s done in %.2f s", name, result))
end
do
  local pool <close> = luamp.Pool(luamp.cpu_count())
  local requests = {}
  for name = 0, 9 do
    requests[#requests + 1] = pool:apply_async(long_time_task, {name},
      {callback = function(result) callback(name, result) end})
  end
  print("task start")
  for _, r in ipairs(requests) do r:wait() end  -- callbacks run while we wait
end
print("All task done.")
