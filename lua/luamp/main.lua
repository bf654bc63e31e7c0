-- luamp.main: builds the public luamp table. The C core (luamp._core) provides the
-- primitives; each part below is a Lua module returning the public names it defines.
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
for _, name in ipairs(parts) do
  if package.preload[name] or package.loaded[name] then
    for k, v in pairs(require(name)) do M[k] = v end
  end
end

return M
