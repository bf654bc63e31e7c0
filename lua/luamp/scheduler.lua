-- luamp.scheduler: luamp.task, Task and luamp.run. The C side (runtime/sched.c) gives
-- every task a Lua thread (and a C stack while it runs or waits in C) and suspends it in
-- whichever luamp wait it makes; this file keeps what a task returned or raised and who
-- waits for it.
local core = require "luamp._core"
local U = require "luamp.util"

local is_error = core.is_error
local raise = U.raise

local Task = {}
Task.__index = Task
Task.__name = "luamp.Task"
Task.__tostring = function(t)
  return string.format("luamp.Task(%d, %s)", t.id,
    t._done and (t._cancelled_done and "cancelled" or (t._err ~= nil and "failed" or "done")) or "running")
end

local live = {}      -- id -> Task not finished yet
local failed = {}    -- tasks that raised, in order; run() raises the first nobody waited for

-- The traceback stops where the runner called the task.
local function handler(e)
  local tb = debug.traceback("", 2)
  local cut = tb:find("\n%s*%[C%]: in function 'xpcall'") or tb:find("\n%s*luamp/scheduler%.lua:")
  return {e = e, tb = cut and tb:sub(1, cut - 1) or tb}
end

local NONE = table.pack()   -- the results of a task that returned nothing (never changed)

local function finish(t)
  t._done = true
  live[t.id] = nil
  local waiters = t._waiters
  if waiters then
    for id in pairs(waiters) do core.task_unpark(id) end
  end
end

-- What xpcall returned: no table is made for a task that returns nothing.
local function settle(t, ok, ...)
  if ok then
    t._results = select("#", ...) == 0 and NONE or table.pack(...)
  else
    local e = ...
    t._err, t._tb = e.e, e.tb
    if is_error(t._err, "Interrupted") then
      if not t._cancelled then
        core.sched_interrupt()   -- a Ctrl-C struck this task's Lua code: run() raises it
      end
      t._cancelled_done = true
    else
      failed[#failed + 1] = t
    end
  end
  finish(t)
end

-- Runs on the task's own thread (sched.c resumes it first thing).
local function runner(t, fn, ...)
  if t._cancelled then
    t._err, t._tb, t._cancelled_done = core.error("Interrupted", "task cancelled"), "", true
    return finish(t)
  end
  return settle(t, xpcall(fn, handler, ...))
end

local function task(fn, ...)
  if type(fn) ~= "function" and not (getmetatable(fn) or {}).__call then
    raise("Value", "luamp.task: expected a function, got " .. type(fn))
  end
  -- every field finish() touches is there from the start: no resize, no __index
  local t = setmetatable({_done = false, id = false, _results = false, _waiters = false}, Task)
  t.id = core.task_new(runner, t, fn, ...)
  live[t.id] = t
  return t
end

function Task:done()
  return self._done
end

-- cancel(): the task's current wait (or its next one) raises Interrupted; a task that
-- has not started does not start. Returns false if it had finished already.
function Task:cancel()
  if self._done then return false end
  self._cancelled = true
  core.task_cancel(self.id)
  return true
end

-- A task whose error nobody saw (no wait, and run() never raised it) reports it on its
-- way out, at the latest when the state closes, as Python's "Task exception was never
-- retrieved" does (a forked child's copies are never collected: `failed` holds them).
Task.__gc = function(t)
  if t._err == nil or t._waited or t._cancelled_done then return end
  io.stderr:write(string.format("luamp: error in luamp.Task(%s), never waited for: %s\ntask traceback:%s\n",
    tostring(t.id), tostring(t._err), tostring(t._tb)))
end

local function with_traceback(e, tb)
  if tb == nil or tb == "" then return e end
  if type(e) == "string" then return e .. "\n" .. tb end
  if is_error(e) and type(e.message) == "string" then
    e.message = e.message .. "\n" .. tb
  elseif type(e) == "table" and getmetatable(e) == nil then
    e.traceback = tb
  end
  return e
end

-- wait([timeout]) -> the task function's results; raises its error, or Timeout.
function Task:wait(timeout)
  U.check_timeout("Task:wait", timeout)
  self._waited = true
  if not self._done then
    local deadline = timeout and core.time() + math.max(timeout, 0)
    local me = core.task_current()
    if me == self.id then raise("Value", "Task:wait: a task cannot wait for itself") end
    if me then
      self._waiters = self._waiters or {}
      self._waiters[me] = true
      while not self._done do
        local left = deadline and math.max(0, deadline - core.time())
        if left == 0 then break end
        core.task_park(left)
      end
      self._waiters[me] = nil
    else
      while not self._done do
        local left = deadline and deadline - core.time()
        if left and left <= 0 then break end
        if core.task_count() == 0 then
          raise("Value", "Task:wait: the task belongs to another process")
        end
        core.sched_step(left)
      end
    end
    if not self._done then raise("Timeout", "Task:wait: timed out") end
  end
  if self._err ~= nil then error(self._err, 0) end
  return table.unpack(self._results, 1, self._results.n)
end

-- run(): runs the tasks until every one has finished. Ctrl-C cancels them all (each
-- finishes its unwinding) and raises Interrupted; then the first error of a task
-- nobody waited for is raised, with that task's traceback.
local function run()
  if core.task_current() then raise("Value", "luamp.run: called inside a task") end
  local ok, err = pcall(function()   -- re-raised below (Interrupted after cancelling)
    while core.task_count() > 0 do core.sched_step(nil, true) end
  end)
  if not ok then
    if is_error(err, "Interrupted") then
      for _, t in pairs(live) do t:cancel() end
      while core.task_count() > 0 do core.sched_step() end   -- a second Ctrl-C stops this
    end
    error(err, 0)
  end
  local list = failed
  failed = {}
  for _, t in ipairs(list) do
    if not t._waited then
      t._waited = true
      error(with_traceback(t._err, "task traceback:" .. t._tb), 0)
    end
  end
end

return {task = task, run = run}
