-- Port of the "one worker per CPU" example: ten long_time_task calls on a Pool of
-- cpu_count() workers; close, then join. (Tasks sleep up to 5 s in the seed; pass the
-- longest sleep as the first argument.)
local luamp = require "luamp"
local longest = tonumber(arg and arg[1]) or 5

local function long_time_task(name)
  print(string.format("Running task %s (%d)", name, luamp.getpid()))
  io.stdout:flush()
  local start = luamp.time()
  luamp.sleep(math.random() * longest)
  print(string.format("Task %s run %0.2f seconds.", name, luamp.time() - start))
end

local worker = luamp.cpu_count()
print(string.format("Parent process %d", luamp.getpid()))
print(string.format("PC has %d CPU workers", worker))
local p = luamp.Pool(worker)
for i = 0, 9 do p:apply_async(long_time_task, {i}) end
print("wait for all subprocess done.")
p:close()
print("task start")
io.stdout:flush()
p:join()
print("All task done.")
