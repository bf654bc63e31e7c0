-- Port of the seeds' Manager example: a child changes a manager's dict and list, and the
-- parent sees the changes.
--   def func(d, l): d[1] = '2'; d['2'] = 2; d[0.25] = None; l.reverse()
-- (Assigning nil deletes in Lua, so d[0.25] = nil leaves no 0.25 key.)
local luamp = require "luamp"

local function func(d, l)
  d[1] = "2"
  d["2"] = 2
  d[0.25] = nil
  l:reverse()
end

local manager = luamp.Manager()
local d = manager:dict()
local init = {}
for i = 0, 9 do init[#init + 1] = i end
local l = manager:list(init)
local p = luamp.Process{target = func, args = {d, l}}
p:start()
p:join()

local parts = {}
for k, v in pairs(d) do parts[#parts + 1] = luamp.pformat(k) .. ": " .. luamp.pformat(v) end
print("{" .. table.concat(parts, ", ") .. "}")
local items = {}
for _, v in ipairs(l) do items[#items + 1] = tostring(v) end
print("[" .. table.concat(items, ", ") .. "]")
manager:shutdown()
