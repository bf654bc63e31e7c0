-- luamp.pretty: readable text for any Lua value; the REPL prints its results with it.
-- luamp.pformat(v, [opts]) returns the text, luamp.pprint(...) prints its arguments
-- tab-separated, one line (or block) per call.
--
-- Tables are shown nested and sorted: the sequence part (1..n) in order without keys,
-- then number keys ascending, then string keys (bare when they are names), then the
-- rest by type and text. A table inside itself shows as <cycle>. The output is bounded:
-- below `depth` levels a table shows as {...}, a table stops after `items` entries with
-- ..., and one call shows at most `budget` entries in all. Values with a __tostring
-- (luamp objects, error objects) show as their tostring; strings are quoted like %q.
-- A table that fits in `width` columns stays on one line, else one entry per line.
-- Tables are read raw (rawget, next): printing never runs __index or __pairs.
local U = require "luamp.util"

local M = {}

local defaults = {depth = 4, items = 50, budget = 2000, width = 80, indent = "  "}

local reserved = {}
for w in ([[and break do else elseif end false for function goto if in local nil not or
  repeat return then true until while]]):gmatch("%a+") do reserved[w] = true end

local function quote(s)
  return (string.format("%q", s):gsub("\\\n", "\\n"))
end

-- tostring that cannot fail: a __tostring that raises is shown, not propagated
local function safe_tostring(v)
  local ok, s = U.pcall(tostring, v)
  if ok then return s end
  return "<" .. type(v) .. ": error in __tostring: " .. tostring(s) .. ">"
end

local function has_tostring(v)
  local mt = getmetatable(v)
  return type(mt) == "table" and rawget(mt, "__tostring") ~= nil
end

local type_rank = {number = 1, string = 2, boolean = 3}

local function key_less(a, b)
  local ta, tb = type(a), type(b)
  local ra, rb = type_rank[ta] or 4, type_rank[tb] or 4
  if ra ~= rb then return ra < rb end
  if ta == "number" or ta == "string" then return a < b end
  if ta == "boolean" then return not a and b end
  if ta ~= tb then return ta < tb end
  return safe_tostring(a) < safe_tostring(b)
end

local function key_text(k)
  if type(k) == "string" and k:match("^[%a_][%w_]*$") and not reserved[k] then return k end
  if type(k) == "string" then return "[" .. quote(k) .. "]" end
  return "[" .. safe_tostring(k) .. "]"
end

local format

local function format_table(t, st, level, indent)
  if st.path[t] then return "<cycle>" end
  if level > st.depth then return "{...}" end
  local n = 0
  while rawget(t, n + 1) ~= nil do n = n + 1 end
  local keys = {}
  for k in next, t do
    if not (math.type(k) == "integer" and k >= 1 and k <= n) then keys[#keys + 1] = k end
  end
  table.sort(keys, key_less)

  st.path[t] = true
  local inner = indent .. st.indent
  local parts = {}
  local function add(text)
    if #parts >= st.items or st.budget <= 0 then
      parts[#parts + 1] = "..."
      return false
    end
    st.budget = st.budget - 1
    parts[#parts + 1] = text()
    return true
  end
  local going = true
  for i = 1, n do
    going = add(function() return format(rawget(t, i), st, level + 1, inner) end)
    if not going then break end
  end
  if going then
    for _, k in ipairs(keys) do
      if not add(function()
        return key_text(k) .. " = " .. format(rawget(t, k), st, level + 1, inner)
      end) then break end
    end
  end
  st.path[t] = nil

  if #parts == 0 then return "{}" end
  local line = "{" .. table.concat(parts, ", ") .. "}"
  if #indent + #line <= st.width and not line:find("\n", 1, true) then return line end
  return "{\n" .. inner .. table.concat(parts, ",\n" .. inner) .. "\n" .. indent .. "}"
end

function format(v, st, level, indent)
  local t = type(v)
  if t == "string" then return quote(v) end
  if t ~= "table" or has_tostring(v) then return safe_tostring(v) end
  return format_table(v, st, level, indent)
end

local known = {}
for k in pairs(defaults) do known[k] = true end

-- pformat(v, [opts]) -> string; opts: depth, items, budget, width, indent
function M.pformat(v, opts)
  opts = U.options("pformat", opts, nil, known)
  local st = {path = {}}
  for k, d in pairs(defaults) do
    local o = opts[k]
    if o ~= nil and type(o) ~= type(d) then
      U.raise("Value", "pformat: option '" .. k .. "' must be a " .. type(d))
    end
    st[k] = o == nil and d or o
  end
  return format(v, st, 1, "")
end

function M.pprint(...)
  local n = select("#", ...)
  local out = {}
  for i = 1, n do out[i] = M.pformat((select(i, ...))) end
  io.stdout:write(table.concat(out, "\t"), "\n")
end

return M
