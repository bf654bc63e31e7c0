-- Port of the seeds' distributed example, the worker (task_worker.py): connects to the
-- master's manager (on another machine, or this one), takes tasks n and puts back
-- "n * n = n²" until the task queue stays empty.
--   luamp task_worker.lua [server_addr] [port] [seconds per task]
--   (defaults: 127.0.0.1, 5000, 1 as in the seed)
local luamp = require "luamp"

local server_addr = arg and arg[1] or "127.0.0.1"
local port = math.tointeger(tonumber(arg and arg[2] or "5000"))
local pause = tonumber(arg and arg[3] or "1")

-- only the names: the objects live on the master
local QueueManager = luamp.BaseManager{address = {server_addr, port}, authkey = "abc"}
QueueManager:register("get_task_queue")
QueueManager:register("get_result_queue")

print(string.format("Connect to server %s...", server_addr))
QueueManager:connect()
local task = QueueManager:get_task_queue()
local result = QueueManager:get_result_queue()

for _ = 1, 10 do
  local ok, err = pcall(function()
    local n = task:get(true, 1)
    print(string.format("run task %d * %d...", n, n))
    local r = string.format("%d * %d = %d", n, n, n * n)
    luamp.sleep(pause)
    result:put(r)
  end)
  if not ok then
    if type(err) == "table" and err.kind == luamp.errors.Empty then
      print("task queue is empty.")
    else
      error(err, 0)      -- Interrupted and everything else go on up
    end
  end
end
print("worker exit.")
