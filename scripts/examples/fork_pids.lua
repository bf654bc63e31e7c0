-- Port of the os.fork example: luamp forks for you, so the child and the parent each
-- report who they are.
local luamp = require "luamp"

print(string.format("Process (%d) start...", luamp.getpid()))
local p = luamp.Process{target = function()
  print(string.format("I am child process (%d) and my parent is %d.", luamp.getpid(), luamp.getppid()))
end}
p:start()
print(string.format("I (%d) just created a child process (%d).", luamp.getpid(), p.pid))
p:join()
