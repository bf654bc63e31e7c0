-- Port of the map_async example: the callback receives the list of every task's result
-- (each task returns how long it slept) and runs in the parent, here while it is blocked
-- in join. (Tasks sleep up to 5 s in the seed; pass the longest sleep as the first
-- argument.)
local luamp = require "luamp"
local longest = tonumber(arg and arg[1]) or 5

local function long_time_task(name)
  print(string.format("Running task %s (%d)", name, luamp.getpid()))
  io.stdout:flush()
  local start = luamp.time()
  luamp.sleep(math.random() * longest)
  local spend = luamp.time() - start
  print(string.format("Task %s run %0.2f seconds.", name, spend))
  return spend
end

local worker = luamp.cpu_count()
print(string.format("Parent process %d", luamp.getpid()))
print(string.format("PC has %d CPU workers", worker))
local p = luamp.Pool(worker)

local function callback(results)
  local parts = {}
  for i = 1, results.n do parts[i] = string.format("%.2f", results[i]) end
  print("all process done", results.n, table.concat(parts, " "))
end

local names = {}
for i = 0, 9 do names[#names + 1] = i end
p:map_async(long_time_task, names, {callback = callback})

print("wait for all subprocess done.")
p:close()
print("task start")
io.stdout:flush()
p:join()
print("All task done.")
