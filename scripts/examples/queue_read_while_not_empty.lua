-- Port of the seeds' "read while not empty" example. The seed's own lesson: the reader
-- stops as soon as it finds the queue empty, which may happen before the writer has put
-- everything, so the reader may print fewer than five items.
--   def writeQ(q):
--       for value in ['A', 'B', 'C', 'D', 'E']:
--           print 'Put %s to queue ...' % value; q.put(value); time.sleep(random.random())
--   def readQ(q):
--       print 'read q and q status: ', q.empty()
--       while not q.empty():
--           print 'q is not empty'; value = q.get()
--           print 'Get %s from queue ...' % value; time.sleep(random.random() * 2)
--   pw.start(); time.sleep(0.001); pr.start(); pw.join(); pr.join()
-- Pass the longest pause in seconds as the first argument (default 1, as the seed).
local luamp = require "luamp"
local pause = tonumber(arg and arg[1]) or 1

local function writeQ(q)
  for _, value in ipairs({"A", "B", "C", "D", "E"}) do
    print(string.format("Put %s to queue ...", value))
    io.stdout:flush()
    q:put(value)
    luamp.sleep(math.random() * pause)
  end
end

local function readQ(q)
  print("read q and q status: ", q:empty())
  while not q:empty() do
    print("q is not empty")
    local value = q:get()
    print(string.format("Get %s from queue ...", value))
    io.stdout:flush()
    luamp.sleep(math.random() * pause * 2)
  end
end

local q = luamp.Queue()
local pw = luamp.Process{target = writeQ, args = {q}}
local pr = luamp.Process{target = readQ, args = {q}}
pw:start()
luamp.sleep(0.001)
pr:start()
pw:join()
pr:join()
