-- luamp.connection: Pipe and wait. Connection objects live in runtime/connection.c; this
-- file adds the public constructor and luamp.wait, which waits on connections, process
-- sentinels and queues at once.
local core = require "luamp._core"
local U = require "luamp.util"

local M = {}

-- Pipe([duplex=true]) -> two connected ends; Pipe(false) -> reader, writer.
function M.Pipe(duplex)
  if duplex ~= nil and type(duplex) ~= "boolean" then
    U.raise("Value", "Pipe: duplex must be a boolean")
  end
  return core.pipe(duplex ~= false)
end

-- An object's way of being waited on: "conn", "queue", "result" (an AsyncResult) or "fd"
-- (an integer sentinel, or anything with a sentinel field, such as a Process or a Popen,
-- or a fileno method).
local function kind_of(obj)
  if math.type(obj) == "integer" then return "fd", obj end
  -- (fileno and empty raise Closed now, before any queue is registered as a waiter)
  if core.is_connection(obj) then obj:fileno() return "conn" end
  if core.is_queue and core.is_queue(obj) then obj:empty() return "queue" end
  if type(obj) == "table" or type(obj) == "userdata" then
    -- an AsyncResult: ready when its job is; waited on through its pool's fds
    local okr, wf = U.pcall(function() return obj._wait_fds end)
    if okr and type(wf) == "function" then return "result" end
    local ok, s = U.pcall(function() return obj.sentinel end)
    if ok and math.type(s) == "integer" then return "fd", s end
    local ok2, f = U.pcall(function() return obj.fileno end)
    if ok2 and type(f) == "function" then
      local fd = f(obj)
      if math.type(fd) == "integer" then return "fd", fd end
    end
  end
  U.raise("Value", "wait: cannot wait on " .. tostring(obj))
end

-- wait(objects, [timeout]) -> the objects that are ready, in the order given: a
-- connection with a message (or whose peer closed), a queue with an item, a sentinel
-- whose process ended. An empty list when the timeout passes first.
function M.wait(objects, timeout)
  if type(objects) ~= "table" then U.raise("Value", "wait: expected a list of objects") end
  U.check_timeout("wait", timeout)
  local deadline = timeout and core.time() + math.max(timeout, 0)
  local n = #objects
  local kinds, fds = {}, {}
  for i = 1, n do
    local k, fd = kind_of(objects[i])
    kinds[i] = k
    if k == "fd" then fds[i] = fd end
  end
  while true do
    local ready, registered, polled, owner = {}, {}, {}, {}
    local results = false
    for i = 1, n do
      local obj, k = objects[i], kinds[i]
      local fd
      if k == "conn" then
        if obj:_ready_now() then ready[#ready + 1] = i else fd = obj:fileno() end
      elseif k == "queue" then
        fd = obj:_wait_begin()
        if fd then registered[#registered + 1] = i else ready[#ready + 1] = i end
      elseif k == "result" then
        local rfds = obj:_wait_fds()
        if not rfds then
          ready[#ready + 1] = i
        else
          results = true
          for _, rfd in ipairs(rfds) do
            polled[#polled + 1] = rfd
            owner[#polled] = false
          end
        end
      else
        fd = fds[i]
      end
      if fd then
        polled[#polled + 1] = fd
        owner[#polled] = i
      end
    end
    local fired = {}
    do
      local left = #ready > 0 and 0 or deadline and math.max(deadline - core.time(), 0)
      local ok, res = pcall(core.wait_fds, polled, left)   -- re-raised below, whatever it is
      if not ok then
        for _, i in ipairs(registered) do objects[i]:_wait_end() end
        error(res, 0)
      end
      local set = {}
      for _, fd in ipairs(res) do set[fd] = true end
      for j, fd in ipairs(polled) do
        if set[fd] and owner[j] then fired[owner[j]] = true end
      end
      -- a pool fd fired: let the pool take its results, then see which results are ready
      if results and #res > 0 then
        core.pump_poll()
        for i = 1, n do
          if kinds[i] == "result" and objects[i]:ready() then fired[i] = true end
        end
      end
    end
    -- a queue counts only if it still holds an item once we look under its lock
    for _, i in ipairs(registered) do
      if objects[i]:_wait_end() then ready[#ready + 1] = i end
      fired[i] = nil
    end
    -- (a result ready before the poll is listed already: once is enough)
    local listed = {}
    for _, i in ipairs(ready) do listed[i] = true end
    for i in pairs(fired) do
      if not listed[i] then ready[#ready + 1] = i end
    end
    if #ready > 0 or (deadline and core.time() >= deadline) then
      table.sort(ready)
      local out = {}
      for j, i in ipairs(ready) do out[j] = objects[i] end
      return out
    end
  end
end

return M
