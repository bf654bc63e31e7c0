-- luamp.util: small helpers the Lua parts share (option tables, argument checks).
local core = require "luamp._core"

local U = {}

-- The tracing switch and recorders (lua/luamp/trace.lua fills them in): what
-- process.lua checks before recording. It lives here so that the check does not load
-- the trace module, which a spawn child (it does not trace) would compile for nothing.
U.trace_state = {on = false}

function U.raise(kind, message, fields)
  core.raise(kind, message, fields)
end

-- Ctrl-C always wins: luamp's protective pcalls must not catch it. U.pcall is pcall,
-- except that a luamp Interrupted error goes on up as it is (what it caught is otherwise
-- returned as pcall returns it); U.xpcall is the same for xpcall (the message handler
-- never sees an Interrupted). Every pcall in luamp's Lua half goes through one of them
-- unless it re-raises what it caught anyway.
local is_error = core.is_error

local function interrupted(e)
  return is_error(e, "Interrupted")
end
U.interrupted = interrupted

local function pass(ok, ...)
  if not ok and interrupted((...)) then error((...), 0) end
  return ok, ...
end

function U.pcall(f, ...)
  return pass(pcall(f, ...))
end

function U.xpcall(f, msgh, ...)
  return pass(xpcall(f, function(e)
    if interrupted(e) then return e end
    return msgh(e)
  end, ...))
end

-- Normalises `Ctor(x)` / `Ctor{...}`: a plain table (no metatable) is the options table,
-- anything else is the single positional option `positional`. Unknown keys raise Value
-- unless `allow_extra` is set.
function U.options(what, arg, positional, known, allow_extra)
  local opts
  if type(arg) == "table" and getmetatable(arg) == nil then
    opts = arg
  elseif arg == nil then
    opts = {}
  elseif positional then
    opts = {[positional] = arg}
  else
    U.raise("Value", what .. ": expected an options table, got " .. type(arg))
  end
  if not allow_extra then
    for k in pairs(opts) do
      if not known[k] then
        U.raise("Value", string.format("%s: unknown option '%s'", what, tostring(k)))
      end
    end
  end
  return opts
end

-- Argument list with nils: honours `n` (as table.pack makes it), else #t.
function U.unpack_args(t)
  if t == nil then return end
  return table.unpack(t, 1, t.n or #t)
end

function U.check_timeout(what, t)
  if t ~= nil and (type(t) ~= "number" or t ~= t) then
    U.raise("Value", what .. ": timeout must be a number of seconds or nil")
  end
  return t
end

-- The length of a Pool input list: its field n (table.pack) when that is a count, else #.
function U.sequence_len(list, what)
  if type(list) ~= "table" then
    U.raise("Value", what .. ": expected a sequence (table) or an iterator function, got " .. type(list))
  end
  local n = list.n
  if math.type(n) == "integer" and n >= 0 then return n end
  return #list
end

-- Options after a Pool call's function and list: a number (chunksize) or a table whose
-- keys are all in `known`. What each option must be is the caller's to check.
function U.call_options(what, opts, known)
  if opts == nil then return {} end
  if math.type(opts) == "integer" then return {chunksize = opts} end
  if type(opts) ~= "table" then U.raise("Value", what .. ": expected a chunksize or an options table") end
  for k in pairs(opts) do
    if not known[k] then U.raise("Value", string.format("%s: unknown option '%s'", what, tostring(k))) end
  end
  return opts
end

-- The methods of an AsyncResult class (luamp.Pool's, luamp.broker's) that only read its
-- job record {ready =, ok =}, found in the result under `key`: successful() and how it
-- prints.
function U.async_result_methods(class, key)
  function class:successful()
    local job = self[key]
    if not job.ready then U.raise("Value", "result is not ready") end
    return job.ok
  end
  class.__tostring = function(self)
    local job = self[key]
    if not job.ready then return "<AsyncResult ready=false>" end
    return string.format("<AsyncResult ready=true successful=%s>", tostring(job.ok))
  end
end

return U
