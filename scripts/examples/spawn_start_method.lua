-- Port of the seeds' start-method example: the child is started with `spawn`, a fresh
-- interpreter that does not run this script again.
--   def foo():
--       print('I M A SON PRECESS START WITH SPAWN:')
--       print(f.readline())
--   if __name__ == '__main__':
--       mp.set_start_method('spawn')
--       f = open('01_multiprocessing.py', 'r')
--       p = mp.Process(target=foo, args=()); p.start(); p.join()
-- In Python the child fails (NameError: `f` was made by the parent's main block, which
-- the spawn child does not run). The same holds here for a global: the child has its
-- own globals. So the child is given what it needs, the file's name, and opens it itself
-- (an open Lua file cannot cross to another process).
local luamp = require "luamp"

local function foo(path)
  print("I M A SON PROCESS START WITH SPAWN:")
  print("the parent's global f in the child:", f)
  local file = assert(io.open(path))
  print(file:read("l"))
  file:close()
end

luamp.set_start_method("spawn")
f = assert(io.open(arg[0]))      -- a global of the parent only
local p = luamp.Process{target = foo, args = {arg[0]}}
p:start()
p:join()
f:close()
print("start method:", luamp.get_start_method(), "exitcode:", p.exitcode)
