-- Port of the seeds' writer/reader Queue example: one child writes A, B, C with random
-- pauses, another reads forever; the parent waits for the writer, then terminates the
-- reader, which never ends by itself.
--   def write(q):
--       print('Process to write: %s' % os.getpid())
--       for value in ['A', 'B', 'C']:
--           print('Put %s to queue...' % value); q.put(value); time.sleep(random.random())
--   def read(q):
--       print('Process to read: %s' % os.getpid())
--       while True:
--           value = q.get(True); print('Get %s from queue.' % value)
--   pw.start(); pr.start(); pw.join(); pr.terminate()
-- The pauses are random up to 1 s as in the seed; pass a smaller bound as the first
-- argument. Unlike the seed, the parent waits for the reader to have taken C before it
-- terminates it, so that the last line is never lost (the queue is empty then).
local luamp = require "luamp"
local pause = tonumber(arg and arg[1]) or 1

local function write(q)
  print(string.format("Process to write: %d", luamp.getpid()))
  for _, value in ipairs({"A", "B", "C"}) do
    print(string.format("Put %s to queue...", value))
    io.stdout:flush()
    q:put(value)
    luamp.sleep(math.random() * pause)
  end
end

local function read(q, done)
  print(string.format("Process to read: %d", luamp.getpid()))
  while true do
    local value = q:get(true)
    print(string.format("Get %s from queue.", value))
    io.stdout:flush()
    if value == "C" then done:put(true) end
  end
end

local q, done = luamp.Queue(), luamp.Queue()
local pw = luamp.Process{target = write, args = {q}}
local pr = luamp.Process{target = read, args = {q, done}}
pw:start()
pr:start()
pw:join()
done:get()
pr:terminate()
pr:join()
