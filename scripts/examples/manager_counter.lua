-- Port of the seeds' "lock" example with a Manager Value: 100 processes each add 1 to
-- manager.Value('tmp', 0) under a Lock, so the total is always 100.
--   def testFunc(cc):
--       with lock: sum.value += cc
local luamp = require "luamp"

local manager = luamp.Manager()
local sum = manager:Value("tmp", 0)
local lock = luamp.Lock()

local function testFunc(cc)
  lock:with(function() sum.value = sum.value + cc end)
end

local ps = {}
for i = 1, 100 do ps[i] = luamp.Process{target = testFunc, args = {1}} end
for i = 1, #ps do ps[i]:start() end
for i = 1, #ps do ps[i]:join() end

print("------------------------")
print("process id:", luamp.getpid())
print(sum.value)
manager:shutdown()
