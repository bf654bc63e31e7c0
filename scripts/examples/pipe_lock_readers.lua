-- Port of the seeds' Pipe-with-Lock example: one writer sends five values through one
-- end of a duplex pipe; two readers share the other end and take turns under a lock,
-- each receiving two values (the fifth stays in the pipe).
--   l = Lock()
--   def writeQ(q):
--       for value in ['A', 'B', 'C', 'D', 'E']:
--           print 'Put %s to queue ...' % value; q.send(value); time.sleep(random.random())
--   def readQ(q):
--       for _ in range(2):
--           l.acquire(); print 'read q and q status: ', q.recv(); l.release()
--   parent_conn, child_conn = Pipe()
--   pw = Process(target=writeQ, args=(child_conn,))
--   pr = Process(target=readQ, args=(parent_conn,)); pt = Process(target=readQ, args=(parent_conn,))
--   pw.start(); pr.start(); pt.start(); pw.join(); pr.join(); pt.join()
-- A Pipe end never hands a reader more than the message it asked for, so two processes
-- may share it as long as they take turns. Pass the longest pause as the first argument.
local luamp = require "luamp"
local pause = tonumber(arg and arg[1]) or 1

local l = luamp.Lock()

local function writeQ(q)
  for _, value in ipairs({"A", "B", "C", "D", "E"}) do
    print(string.format("Put %s to queue ...", value))
    io.stdout:flush()
    q:send(value)
    luamp.sleep(math.random() * pause)
  end
end

local function readQ(q)
  for _ = 1, 2 do
    l:acquire()
    print("read q and q status: ", q:recv())
    io.stdout:flush()
    l:release()
  end
end

local parent_conn, child_conn = luamp.Pipe()
local pw = luamp.Process{target = writeQ, args = {child_conn}}
local pr = luamp.Process{target = readQ, args = {parent_conn}}
local pt = luamp.Process{target = readQ, args = {parent_conn}}
pw:start()
pr:start()
pt:start()
pw:join()
pr:join()
pt:join()
