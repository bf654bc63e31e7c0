-- Port of the seeds' "进程之间的同步和Lock" example: ten processes print under one Lock,
-- so their lines never mix.
--   def f(l, i): l.acquire(); print('hello TTS', i); l.release()
--   lock = Lock()
--   for num in range(10): Process(target=f, args=(lock, num)).start()
local luamp = require "luamp"

local function f(l, i)
  l:acquire()
  print("hello TTS", i)
  l:release()
end

local lock = luamp.Lock()
for num = 0, 9 do
  luamp.Process{target = f, args = {lock, num}}:start()
end
-- like Python, the children are joined when the main script ends
