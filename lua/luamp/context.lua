-- luamp.context: get_context(method) -> an object whose fields are the module's
-- constructors, called with a dot (ctx.Process{...}, ctx.Queue()), bound to one start
-- method. Only Process (and Pool, whose workers are processes) depend on the method;
-- the other objects are the same under every method (how they reach a spawn child is
-- the codec's handle business).
local P = require "luamp.process"

local Context = {}
Context.__index = Context
Context.__name = "luamp.Context"
Context.__tostring = function(self) return "<luamp.Context " .. self._method .. ">" end

-- constructors that do not depend on the start method: looked up on the module when the
-- context is made, so that parts not built (Manager) are simply absent
local SAME = {"Queue", "SimpleQueue", "JoinableQueue", "Pipe", "Lock", "RLock", "Semaphore",
              "BoundedSemaphore", "Event", "Condition", "Barrier", "Value", "Array", "Manager"}

local M = {}

function M.get_context(method)
  local luamp = require "luamp"
  local m = method == nil and P.get_start_method() or P._check_method(method)
  local ctx = setmetatable({_method = m}, Context)
  for _, name in ipairs(SAME) do ctx[name] = luamp[name] end
  ctx.Process = function(opts) return P._process_with_method(m, opts) end
  ctx.Pool = function(...) return require("luamp.pool")._pool_with_method(m, ...) end
  ctx.get_start_method = function() return m end
  return ctx
end

return M
