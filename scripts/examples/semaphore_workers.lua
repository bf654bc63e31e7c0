-- Port of the seeds' semaphore example: ten workers compete for a Semaphore(2), so at
-- most two "do something" at a time. The seed uses threads and sleeps 2 s; here they
-- are processes and the first argument sets the time (default 2).
local luamp = require "luamp"
local seconds = tonumber(arg and arg[1]) or 2

local semaphore = luamp.Semaphore(2)

local function worker(id)
  print(string.format("thread %d acquire semaphore", id))
  semaphore:acquire()
  print(string.format("thread %d get semaphore do something", id))
  luamp.sleep(seconds)
  semaphore:release()
  print(string.format("thread %d release semaphore", id))
end

for i = 0, 9 do
  luamp.Process{target = worker, args = {i}}:start()
end
