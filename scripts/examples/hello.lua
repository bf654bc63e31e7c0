-- Port of the seeds' first example: start a process that greets, wait for it.
--   from multiprocessing import Process
--   def f(name): print('hello', name)
--   p = Process(target=f, args=('bob',)); p.start(); p.join()
local luamp = require "luamp"

local function f(name)
  print("hello", name)
end

local p = luamp.Process{target = f, args = {"bob"}}
p:start()
p:join()
