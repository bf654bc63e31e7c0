-- Port of the sleeper example: toggling daemon before start, then joining. The seed
-- sleeps 5 s; the first argument overrides it.
local luamp = require "luamp"
local seconds = tonumber(arg and arg[1]) or 5

local function sleeper(name, secs)
  print("starting child process with id: ", luamp.getpid())
  print("parent process:", luamp.getppid())
  print(string.format("sleeping for %s ", secs))
  luamp.sleep(secs)
  print(name .. " done sleeping")
end

print(string.format("in parent process (id %d)", luamp.getpid()))
local p = luamp.Process{target = sleeper, args = {"bob", seconds}}
print("daemon?", p.daemon)
p.daemon = not p.daemon
print("daemon?", p.daemon)
p:start()
print("in parent process after child process start")
print("parent process about to join child process")
p:join()
print("in parent process after child process join")
print("parent process exiting with id ", luamp.getpid())
print("The parent's parent process:", luamp.getppid())
