-- Port of the seeds' RLock example: the holder may acquire an RLock again without
-- blocking, and must release it as many times. Another process waits meanwhile.
--   rLock = threading.RLock(); rLock.acquire(); rLock.acquire(); rLock.release(); rLock.release()
local luamp = require "luamp"

local rlock = luamp.RLock()
rlock:acquire()
rlock:acquire()        -- the same process: no blocking
print(rlock)

local p = luamp.Process{target = function()
  rlock:acquire()      -- waits until the parent has released both times
  print("child got the lock")
  rlock:release()
end}
p:start()

rlock:release()
print("released once, still held:", rlock:locked())
rlock:release()
p:join()
print(rlock)
