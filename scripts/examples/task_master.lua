-- Port of the seeds' distributed example, the master (task_master.py): a BaseManager
-- serves two queues on the network with authkey 'abc'; the master puts ten tasks and
-- reads ten results that workers on other machines (task_worker.lua) computed.
--   luamp task_master.lua [host] [port]      (defaults: all interfaces, 5000)
-- With port 0 the system picks one; the line "Manager at host:port" says which.
local luamp = require "luamp"

local host = arg and arg[1] or ""
local port = math.tointeger(tonumber(arg and arg[2] or "5000"))

-- the queues the tasks and results travel through (the seed's queue.Queue)
local task_queue = luamp.Queue()
local result_queue = luamp.Queue()

local QueueManager = luamp.BaseManager{address = {host, port}, authkey = "abc"}
-- both queues go on the network; callable gives the object a proxy stands for
QueueManager:register("get_task_queue", function() return task_queue end)
QueueManager:register("get_result_queue", function() return result_queue end)
QueueManager:start()
print(string.format("Manager at %s:%d", QueueManager.address[1], QueueManager.address[2]))
io.stdout:flush()

-- through the manager, as the seed insists, not on task_queue directly
local task = QueueManager:get_task_queue()
local result = QueueManager:get_result_queue()

math.randomseed(os.time(), luamp.getpid())
for _ = 1, 10 do
  local n = math.random(0, 10000)
  print(string.format("Put task %d...", n))
  task:put(n)
end
io.stdout:flush()

print("Try get results...")
for _ = 1, 10 do
  local r = result:get(true, 10)
  print("Result: " .. r)
end

QueueManager:shutdown()
print("master exit.")
