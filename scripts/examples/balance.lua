-- Port of the seeds' bank-balance example (threads there, processes here): two workers
-- each deposit and withdraw the same amount many times on a shared balance. Each change
-- happens under a Lock, so the balance ends at 0. The first argument sets the number of
-- rounds (default 100000).
--   def change_it(n): global balance; balance = balance + n; balance = balance - n
--   def run_thread(n):
--       for i in range(100000): lock.acquire(); change_it(n); lock.release()
local luamp = require "luamp"
local rounds = tonumber(arg and arg[1]) or 100000

local balance = luamp.Value("q", 0, {lock = false})
local lock = luamp.Lock()

local function change_it(n)
  balance.value = balance.value + n
  balance.value = balance.value - n
end

local function run_thread(n)
  for _ = 1, rounds do
    lock:acquire()
    change_it(n)
    lock:release()
  end
end

local t1 = luamp.Process{target = run_thread, args = {5}}
local t2 = luamp.Process{target = run_thread, args = {8}}
t1:start(); t2:start()
t1:join(); t2:join()
print(balance.value)
