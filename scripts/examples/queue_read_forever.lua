-- Port of the seeds' "read forever, then terminate" example: the reader loops on a
-- blocking get; once the writer is done the parent terminates it. As the seed remarks,
-- terminating as soon as the writer ends may cut the reader short; with the argument
-- "until-empty" the parent first spins until the queue is empty, as in the seed's third
-- variant (the reader may then still be printing its last item).
--   def readQ(q):
--       while True:
--           print 'read q and q status: ', q.empty()
--           value = q.get(); print 'Get %s from queue ...' % value
--           time.sleep(random.random())
--   pw.start(); pr.start(); pw.join()
--   pr.terminate()                         # variant 2
--   while True:                            # variant 3
--       if q.empty(): pr.terminate(); break
-- The second argument bounds the random pauses (default 1 s, as the seed).
local luamp = require "luamp"
local mode = arg and arg[1] or "terminate"
local pause = tonumber(arg and arg[2]) or 1

local function writeQ(q)
  for _, value in ipairs({"A", "B", "C", "D", "E"}) do
    print(string.format("Put %s to queue ...", value))
    io.stdout:flush()
    q:put(value)
    luamp.sleep(math.random() * pause)
  end
end

local function readQ(q)
  while true do
    print("read q and q status: ", q:empty())
    io.stdout:flush()
    local value = q:get()
    print(string.format("Get %s from queue ...", value))
    io.stdout:flush()
    luamp.sleep(math.random() * pause)
  end
end

local q = luamp.Queue()
local pw = luamp.Process{target = writeQ, args = {q}}
local pr = luamp.Process{target = readQ, args = {q}}
pw:start()
pr:start()
pw:join()
if mode == "until-empty" then
  while not q:empty() do luamp.sleep(0.001) end
end
pr:terminate()
pr:join()
print("reader exit code", pr.exitcode)
