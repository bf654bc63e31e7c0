-- Port of run_proc: start a child process and wait for it to end.
local luamp = require "luamp"

local function run_proc(name)
  print(string.format("Run child process %s (%d)...", name, luamp.getpid()))
end

print(string.format("Parent process %d.", luamp.getpid()))
local p = luamp.Process{target = run_proc, args = {"test"}}
print("Child process will start.")
p:start()
p:join()
print("Child process end.")
