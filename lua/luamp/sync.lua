-- luamp.sync: Lock, RLock, Semaphore, BoundedSemaphore, Event, Condition, Barrier.
--
-- The first five are C objects (runtime/sync.c) whose hot methods are C functions
-- found by one table lookup; this file adds the Lua-level helpers (`with`, `guard`) to
-- their method tables. Condition and Barrier are Lua objects over a C core: the core
-- holds the shared state, this file the Python-shaped behaviour (wait_for, the barrier
-- action). Every object crosses the codec as a handle to the same shared object.
local core = require "luamp._core"
local U = require "luamp.util"

local raise = U.raise

local M = {}

-- ---- with and guard ------------------------------------------------------------------

local function finish_with(lock, ok, ...)
  lock:release()
  if not ok then error((...), 0) end
  return ...
end

-- lock:with(fn, ...) -> fn's results; the lock is released even when fn raises
local function with(self, fn, ...)
  if type(fn) ~= "function" and not (getmetatable(fn) or {}).__call then
    raise("Value", "with: expected a function, got " .. type(fn))
  end
  self:acquire()
  return finish_with(self, pcall(fn, ...))   -- finish_with re-raises what it caught
end

-- local g <close> = lock:guard(): acquired now, released when g goes out of scope. One
-- guard object per lock serves every scope (each <close> releases once).
local guards = setmetatable({}, {__mode = "k"})
local Guard_mt = {
  __name = "luamp.Guard",
  __close = function(g) g.lock:release() end,
  __tostring = function(g) return "<Guard of " .. tostring(g.lock) .. ">" end,
}

local function guard(self)
  local g = guards[self]
  if not g then
    g = setmetatable({lock = self}, Guard_mt)
    guards[self] = g
  end
  self:acquire()
  return g
end

for _, name in ipairs {"Lock", "RLock", "Semaphore", "BoundedSemaphore"} do
  local methods = core.sync_methods(name)
  methods.with = with
  methods.guard = guard
end

function M.Lock() return core.sync_new("Lock") end
function M.RLock() return core.sync_new("RLock") end
function M.Event() return core.sync_new("Event") end

local function semaphore_value(what, arg)
  local opts = U.options(what, arg, "value", {value = true})
  local v = opts.value
  if v ~= nil and math.type(v) ~= "integer" and not (type(v) == "number" and v == math.floor(v)) then
    raise("Value", what .. ": value must be an integer")
  end
  if v ~= nil and v < 0 then raise("Value", what .. ": value must be >= 0") end
  return v
end

function M.Semaphore(value)
  return core.sync_new("Semaphore", semaphore_value("Semaphore", value))
end

function M.BoundedSemaphore(value)
  return core.sync_new("BoundedSemaphore", semaphore_value("BoundedSemaphore", value))
end

for _, name in ipairs {"Lock", "RLock", "Semaphore", "BoundedSemaphore", "Event"} do
  core.register_handle("luamp." .. name, function(payload)
    return core.sync_attach(name, payload)
  end)
end

local function is_lock(v)
  local m = getmetatable(v)
  local name = type(m) == "table" and m.__name
  return name == "luamp.Lock" or name == "luamp.RLock"
end

-- ---- Condition -----------------------------------------------------------------------

local C = setmetatable({}, {__mode = "k"})   -- Condition -> {lock =, cv =}
local Condition = {}
local Condition_mt = {__name = "luamp.Condition"}

local function cstate(self)
  local s = C[self]
  if not s then raise("Value", "expected a Condition") end
  if s.closed then raise("Value", "Condition is closed") end
  return s
end

-- core object -> its Condition or Barrier, so that a handle decoded where the object
-- already lives gives back that very object (the core's identity is the C registry's)
local by_core = setmetatable({}, {__mode = "kv"})

local function new_condition(lock, cv)
  local self = setmetatable({}, Condition_mt)
  C[self] = {lock = lock, cv = cv}
  by_core[cv] = self
  return self
end

function Condition:acquire(...) return cstate(self).lock:acquire(...) end
function Condition:release() return cstate(self).lock:release() end
function Condition:with(fn, ...) return with(self, fn, ...) end
function Condition:guard() return guard(self) end

-- cond:wait([timeout]) -> false if the timeout passed first
function Condition:wait(timeout)
  local s = cstate(self)
  return s.cv:wait(s.lock, U.check_timeout("Condition:wait", timeout))
end

-- cond:wait_for(predicate, [timeout]) -> the predicate's last result
function Condition:wait_for(pred, timeout)
  local s = cstate(self)
  U.check_timeout("Condition:wait_for", timeout)
  local result = pred()
  if result then return result end
  local deadline = timeout and core.time() + timeout
  while not result do
    local left
    if deadline then
      left = deadline - core.time()
      if left <= 0 then break end
    end
    s.cv:wait(s.lock, left)
    result = pred()
  end
  return result
end

function Condition:notify(n)
  if n ~= nil and math.type(n) ~= "integer" then raise("Value", "notify: n must be an integer") end
  local s = cstate(self)
  s.cv:notify(s.lock, n or 1)
end

function Condition:notify_all()
  local s = cstate(self)
  s.cv:notify(s.lock, math.maxinteger)
end

-- Closes the Condition's own shared state; its lock belongs to whoever made it.
function Condition:close()
  local s = C[self]
  if s and not s.closed then
    s.closed = true
    s.cv:close()
  end
end

Condition_mt.__index = function(self, k)
  if k == "recovered" then return cstate(self).lock.recovered end
  return Condition[k]
end
Condition_mt.__close = Condition.close
Condition_mt.__tostring = function(self)
  local s = C[self]
  if s.closed then return "<Condition closed>" end
  return string.format("<Condition lock=%s waiters=%d>", tostring(s.lock), s.cv:waiters())
end
Condition_mt.__luamp_handle = function(self)
  local s = cstate(self)
  return "luamp.Condition", {lock = s.lock, cv = core.sync_payload(s.cv)}
end

-- Condition([lock]): lock defaults to a new RLock, as in Python.
function M.Condition(lock)
  if lock == nil then
    lock = core.sync_new("RLock")
  elseif not is_lock(lock) then
    raise("Value", "Condition: lock must be a Lock or an RLock")
  end
  return new_condition(lock, core.sync_new("CondCore"))
end

core.register_handle("luamp.Condition", function(p)
  if type(p) ~= "table" or not is_lock(p.lock) then raise("Value", "bad Condition handle") end
  local cv = core.sync_attach("CondCore", p.cv)
  local known = by_core[cv]
  if known and C[known] and not C[known].closed then return known end
  return new_condition(p.lock, cv)
end)

-- ---- Barrier -------------------------------------------------------------------------

local B = setmetatable({}, {__mode = "k"})   -- Barrier -> {core =, action =}
local Barrier = {}
local Barrier_mt = {__name = "luamp.Barrier"}

local function bstate(self)
  local s = B[self]
  if not s then raise("Value", "expected a Barrier") end
  if s.closed then raise("Value", "Barrier is closed") end
  return s
end

local function new_barrier(c, action)
  local self = setmetatable({}, Barrier_mt)
  B[self] = {core = c, action = action}
  by_core[c] = self
  return self
end

local function finish_trip(s, index, gen, ok, ...)
  local tripped = s.core:finish(gen, ok)
  if not ok then error((...), 0) end
  if not tripped then raise("BrokenBarrier", "the barrier is broken") end
  return index
end

-- bar:wait([timeout]) -> index in 0 .. parties-1 (the last to arrive gets parties-1)
function Barrier:wait(timeout)
  local s = bstate(self)
  U.check_timeout("Barrier:wait", timeout)
  local index, gen, last = s.core:arrive(s.action ~= nil, timeout)
  if last then return finish_trip(s, index, gen, pcall(s.action)) end   -- re-raised there
  return index
end

function Barrier:reset() bstate(self).core:reset() end
function Barrier:abort() bstate(self).core:abort() end

function Barrier:close()
  local s = B[self]
  if s and not s.closed then
    s.closed = true
    s.core:close()
  end
end

local barrier_props = {
  parties = function(c) return (c:state()) end,
  n_waiting = function(c) local _, n = c:state(); return n end,
  broken = function(c) local _, _, b = c:state(); return b end,
}

Barrier_mt.__index = function(self, k)
  local p = barrier_props[k]
  if p then return p(bstate(self).core) end
  return Barrier[k]
end
Barrier_mt.__close = Barrier.close
Barrier_mt.__tostring = function(self)
  local s = B[self]
  if s.closed then return "<Barrier closed>" end
  local parties, waiting, broken = s.core:state()
  return string.format("<Barrier parties=%d waiting=%d broken=%s>", parties, waiting, tostring(broken))
end
Barrier_mt.__luamp_handle = function(self)
  local s = bstate(self)
  return "luamp.Barrier", {core = core.sync_payload(s.core), action = s.action}
end

-- Barrier(parties, [action], [timeout]) or Barrier{parties =, action =, timeout =}
function M.Barrier(parties, action, timeout)
  if type(parties) == "table" and getmetatable(parties) == nil then
    local o = U.options("Barrier", parties, nil, {parties = true, action = true, timeout = true})
    parties, action, timeout = o.parties, o.action, o.timeout
  end
  if math.type(parties) ~= "integer" and not (type(parties) == "number" and parties == math.floor(parties)) then
    raise("Value", "Barrier: parties must be an integer")
  end
  if parties < 1 then raise("Value", "Barrier: parties must be at least 1") end
  if action ~= nil and type(action) ~= "function" and not (getmetatable(action) or {}).__call then
    raise("Value", "Barrier: action must be callable")
  end
  U.check_timeout("Barrier", timeout)
  return new_barrier(core.sync_new("BarrierCore", parties, timeout), action)
end

core.register_handle("luamp.Barrier", function(p)
  if type(p) ~= "table" then raise("Value", "bad Barrier handle") end
  local c = core.sync_attach("BarrierCore", p.core)
  local known = by_core[c]
  if known and B[known] and not B[known].closed then return known end
  return new_barrier(c, p.action)
end)

return M
