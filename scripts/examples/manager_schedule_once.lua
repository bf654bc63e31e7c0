-- Port of the seeds' 共享变量注意需加锁 example with a Manager Value: three processes each
-- want to start the `printx` worker, but it must run once; a Lock around the manager's
-- Value makes the check-and-start atomic. The seed's printx loops forever; this one
-- prints a few times (first argument, default 3).
local luamp = require "luamp"
local rounds = tonumber(arg and arg[1]) or 3

local manager = luamp.Manager()
local sum = manager:Value("tmp", 0)
local lock = luamp.Lock()

local function printx()
  for _ = 1, rounds do
    print("hello x")
    luamp.sleep(0.01)
  end
end

local function run()
  lock:with(function()
    if sum.value == 0 then
      print("printx is running...")
      luamp.Process{target = printx}:start()
      sum.value = sum.value + 1
    else
      print("printx has ran.")
    end
  end)
end

local ps = {}
for i = 1, 3 do
  ps[i] = luamp.Process{target = run}
  ps[i]:start()
end
for i = 1, 3 do ps[i]:join() end
manager:shutdown()
