-- luamp.shared: Value, Array and SharedMemory. The objects are C userdata
-- (runtime/shared.c); this file parses the Python-shaped arguments (the `lock` option)
-- and registers how each crosses the codec as a handle.
local core = require "luamp._core"
local U = require "luamp.util"

local raise = U.raise

local M = {}

local function is_lock(v)
  local m = getmetatable(v)
  local name = type(m) == "table" and m.__name
  return name == "luamp.Lock" or name == "luamp.RLock"
end

-- The lock option: true/nil -> a new RLock (Python's default), false -> none, or an
-- existing Lock/RLock.
local function lock_option(what, opts)
  if opts == nil then return core.sync_new("RLock") end
  if type(opts) ~= "table" or getmetatable(opts) ~= nil then
    raise("Value", what .. ": options must be a table like {lock = false}")
  end
  for k in pairs(opts) do
    if k ~= "lock" then raise("Value", string.format("%s: unknown option '%s'", what, tostring(k))) end
  end
  local lock = opts.lock
  if lock == nil or lock == true then return core.sync_new("RLock") end
  if lock == false then return false end
  if not is_lock(lock) then raise("Value", what .. ": lock must be a boolean, a Lock or an RLock") end
  return lock
end

-- Value(typecode, [init=0], [{lock = ...}])
function M.Value(typecode, init, opts)
  return core.value_new(typecode, init, lock_option("Value", opts))
end

-- Array(typecode, size_or_table, [{lock = ...}])
function M.Array(typecode, size_or_table, opts)
  return core.array_new(typecode, size_or_table, lock_option("Array", opts))
end

-- SharedMemory{name =, create = false, size = 0} or SharedMemory(name)
function M.SharedMemory(opts)
  opts = U.options("SharedMemory", opts, "name", {name = true, create = true, size = true})
  if opts.name ~= nil and type(opts.name) ~= "string" then raise("Value", "SharedMemory: name must be a string") end
  if opts.size ~= nil and math.type(opts.size) ~= "integer" then raise("Value", "SharedMemory: size must be an integer") end
  return core.shm_new(opts.name, opts.create, opts.size)
end

for _, kind in ipairs {"Value", "Array"} do
  core.register_handle("luamp." .. kind, function(p)
    if type(p) ~= "table" or not (p.lock == false or is_lock(p.lock)) then
      raise("Value", "bad " .. kind .. " handle")
    end
    return core.shared_attach(kind, p.core, p.lock)
  end)
end

core.register_handle("luamp.SharedMemory", function(p)
  if type(p) ~= "table" or type(p.name) ~= "string" then raise("Value", "bad SharedMemory handle") end
  return core.shm_new(p.name, false)
end)

return M
