-- Port of the long_time_task example: five tasks on a Pool of four. Tasks 0-3 start at
-- once; task 4 starts when one of them finishes. close() then join() waits for all.
-- (Each task sleeps up to 3 s in the seed; pass the longest sleep as the first argument.)
local luamp = require "luamp"
local longest = tonumber(arg and arg[1]) or 3

local function long_time_task(name)
  print(string.format("Run task %s (%d)...", name, luamp.getpid()))
  io.stdout:flush()
  local start = luamp.time()
  luamp.sleep(math.random() * longest)
  print(string.format("Task %s runs %0.2f seconds.", name, luamp.time() - start))
end

print(string.format("Parent process %d.", luamp.getpid()))
local p = luamp.Pool(4)
for i = 0, 4 do p:apply_async(long_time_task, {i}) end
print("Waiting for all subprocesses done...")
io.stdout:flush()
p:close()
-- join may only come after close (or terminate)
p:join()
print("All subprocesses done.")
