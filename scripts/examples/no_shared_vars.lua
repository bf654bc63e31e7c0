-- Port of "processes share no variables": a child changes its own copy of a global and
-- of an argument; the parent's table is untouched both times.
local luamp = require "luamp"

local function show(t) return "{" .. table.concat(t, ", ") .. "}" end

a = {}

local function change_global()
  a[#a + 1] = 1
  print("in global", show(a))
end

local function change_local(b)
  b[#b + 1] = 2
  print("in local", show(b))
end

local pg = luamp.Process{target = change_global}
pg:start()
pg:join()
print(show(a))

local pl = luamp.Process{target = change_local, args = {a}}
pl:start()
pl:join()
print(show(a))
