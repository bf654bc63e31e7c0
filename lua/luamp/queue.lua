-- luamp.queue: the public constructors of Queue, SimpleQueue and JoinableQueue. The
-- queues themselves (shared memory, waiting, crash recovery) live in runtime/queue.c.
local core = require "luamp._core"
local U = require "luamp.util"

local M = {}

local function maxsize_of(what, arg)
  local opts = U.options(what, arg, "maxsize", {maxsize = true})
  local m = opts.maxsize
  if m == nil then return 0 end
  if math.type(m) ~= "integer" then
    if type(m) == "number" and m == math.floor(m) and m == m and m > -math.huge and m < math.huge then
      m = math.tointeger(m)
    else
      U.raise("Value", what .. ": maxsize must be an integer")
    end
  end
  return m > 0 and m or 0
end

-- Queue([maxsize]) or Queue{maxsize = n}; maxsize <= 0 or nil means unbounded.
function M.Queue(maxsize)
  if type(maxsize) == "table" and maxsize.broker ~= nil then   -- across machines, over Redis
    return require("luamp.broker").Queue(maxsize)
  end
  return core.queue_new("Queue", maxsize_of("Queue", maxsize))
end

function M.JoinableQueue(maxsize)
  return core.queue_new("JoinableQueue", maxsize_of("JoinableQueue", maxsize))
end

function M.SimpleQueue()
  return core.queue_new("SimpleQueue", 0)
end

return M
