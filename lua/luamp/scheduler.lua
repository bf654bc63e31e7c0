-- luamp.scheduler: luamp.task, Task and luamp.run. The C side (runtime/sched.c) owns the
-- tasks: a Task is a userdata whose thread runs the task function directly, suspends in
-- whichever luamp wait it makes, and keeps its results (or error and traceback) when it
-- ends; this file is the Lua face of it.
local core = require "luamp._core"
local U = require "luamp.util"

local is_error = core.is_error
local raise = U.raise
local done, results = core.task_done, core.task_results

local Task = {}
local mt = core.task_metatable()
mt.__index = Task
mt.__tostring = function(t)
  return string.format("luamp.Task(%d, %s)", core.task_id(t), core.task_state(t))
end

-- A task whose error nobody saw (no wait, and run() never raised it) reports it on its
-- way out, at the latest when the state closes, as Python's "Task exception was never
-- retrieved" does (a forked child's copies are never collected: the failed list holds them).
mt.__gc = function(t)
  local e, tb = core.task_unseen(t)
  if e == nil then return end
  io.stderr:write(string.format("luamp: error in luamp.Task(%s), never waited for: %s\ntask traceback:%s\n",
    tostring(core.task_id(t)), tostring(e), tostring(tb)))
end

local function task(fn, ...)
  if type(fn) ~= "function" and not (getmetatable(fn) or {}).__call then
    raise("Value", "luamp.task: expected a function, got " .. type(fn))
  end
  return core.task_new(fn, ...)
end

function Task:done()
  return done(self)
end

-- cancel(): the task's current wait (or its next one) raises Interrupted; a task that
-- has not started does not start. Returns false if it had finished already.
function Task:cancel()
  return core.task_cancel(self)
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

local function outcome(ok, ...)
  if ok then return ... end
  local e = ...
  if e == nil then e = core.error("Interrupted", "task cancelled") end
  error(e, 0)
end

-- wait([timeout]) -> the task function's results; raises its error, or Timeout.
function Task:wait(timeout)
  U.check_timeout("Task:wait", timeout)
  if not done(self, true) then
    local deadline = timeout and core.time() + math.max(timeout, 0)
    if core.task_in() then
      core.task_join(self, timeout and math.max(timeout, 0))
    else
      while not done(self) do
        local left = deadline and deadline - core.time()
        if left and left <= 0 then break end
        if core.task_count() == 0 then
          raise("Value", "Task:wait: the task belongs to another process")
        end
        core.sched_step(left)
      end
    end
    if not done(self) then raise("Timeout", "Task:wait: timed out") end
  end
  return outcome(results(self))
end

-- run(): runs the tasks until every one has finished. Ctrl-C cancels them all (each
-- finishes its unwinding) and raises Interrupted; then the first error of a task
-- nobody waited for is raised, with that task's traceback.
local function run()
  if core.task_in() then raise("Value", "luamp.run: called inside a task") end
  local ok, err = pcall(function()   -- re-raised below (Interrupted after cancelling)
    while core.task_count() > 0 do core.sched_step(nil, true) end
  end)
  if not ok then
    if is_error(err, "Interrupted") then
      core.task_cancel_all()
      while core.task_count() > 0 do core.sched_step() end   -- a second Ctrl-C stops this
    end
    error(err, 0)
  end
  for _, t in ipairs(core.task_take_failed()) do
    if core.task_claim(t) then
      local _, e, tb = results(t)
      error(with_traceback(e, "task traceback:" .. tb), 0)
    end
  end
end

return {task = task, run = run}
