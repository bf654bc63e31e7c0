-- luamp.main: builds the public luamp table. The C core (luamp._core) provides the
-- primitives; each part below is a Lua module returning the public names it defines.
--
-- The parts are loaded on first use: a name not yet in the table loads the parts in
-- order until one defines it (pairs loads them all). Compiling every part is most of
-- what starting luamp costs, and a spawn child or a forkserver child usually needs only
-- luamp.process. A name already in the table (set by the program) is never replaced by
-- a part loaded later. M._load_all() loads every part now (the forkserver does, once,
-- for all its children).
local core = require "luamp._core"

local M = {
  version = core.version,
  errors = core.errors,
  dumps = core.dumps,
  loads = core.loads,
  _core = core,
}

-- Parts are optional so the tree builds while they are being written; each returns a
-- table of public names.
local parts = {
  "luamp.process", "luamp.connection", "luamp.queue", "luamp.sync", "luamp.shared",
  "luamp.pool", "luamp.subprocess", "luamp.manager", "luamp.scheduler", "luamp.context",
  "luamp.pretty", "luamp.trace",
}
local next_part = 1

-- Loads the next part; false when none is left. A part whose loading raised (Ctrl-C in
-- the middle of compiling it) is tried again by the next use, not skipped.
local function load_next()
  while next_part <= #parts do
    local name = parts[next_part]
    if package.preload[name] or package.loaded[name] then
      local names = require(name)
      next_part = next_part + 1
      for k, v in pairs(names) do
        if rawget(M, k) == nil then rawset(M, k, v) end
      end
      return true
    end
    next_part = next_part + 1
  end
  return false
end

function M._load_all()
  core._open_all()          -- the C parts too (runtime/module.c), whichever Lua part needs them
  while load_next() do end
end

setmetatable(M, {
  __index = function(t, k)
    while load_next() do
      local v = rawget(t, k)
      if v ~= nil then return v end
    end
    return nil
  end,
  __pairs = function(t)
    M._load_all()
    return next, t, nil
  end,
})

return M
