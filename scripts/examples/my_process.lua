-- Port of the Process subclass examples (MyProcess / MuProcess): the run style, where
-- the object carries its own `run` and fields. Each task sleeps a random time below
-- the first argument (seconds, default 1) and reports how long it ran.
local luamp = require "luamp"
local max_sleep = tonumber(arg and arg[1]) or 1

local function MyProcess(name)
  return luamp.Process{name = tostring(name), run = function(self)
    print(string.format("Running task %s (%d)", self.name, luamp.getpid()))
    math.randomseed(luamp.getpid())
    local start = luamp.time()
    luamp.sleep(math.random() * max_sleep)
    print(string.format("Task %s run %0.2f seconds.", self.name, luamp.time() - start))
  end}
end

print(string.format("Parent process %d", luamp.getpid()))
local processes = {}
for i = 0, 9 do processes[#processes + 1] = MyProcess(i) end
for _, p in ipairs(processes) do p:start() end
print("wait for all subprocess done.")
for _, p in ipairs(processes) do p:join() end
print("All task done.")
