-- Driver for codec.sh: times luamp.dumps / luamp.loads on the benchmark cases and prints
-- "case dumps_seconds loads_seconds encoded_bytes iterations" per line (CPU time, best
-- of a few rounds, per operation).
local luamp = require "luamp"

local cases = {}
do
  local ints = {}
  for i = 1, 100000 do ints[i] = i - 1 end
  cases[#cases + 1] = {"ints_100k", ints, 40}
  local recs = {}
  for i = 1, 10000 do
    recs[i] = {id = i - 1, name = "user" .. (i - 1), score = (i - 1) * 1.5, tags = {"a", "b"}}
  end
  cases[#cases + 1] = {"records_10k", recs, 20}
  cases[#cases + 1] = {"string_10mb", string.rep("x", 10 * 1024 * 1024), 20}
  cases[#cases + 1] = {"small_table", {1, 2, 3}, 100000}
end

local function best(fn, n)
  local b = math.huge
  for _ = 1, 3 do
    local t0 = os.clock()
    for _ = 1, n do fn() end
    b = math.min(b, (os.clock() - t0) / n)
  end
  return b
end

local dumps, loads = luamp.dumps, luamp.loads
for _, c in ipairs(cases) do
  local name, v, n = c[1], c[2], c[3]
  local s = dumps(v)
  local d = best(function() dumps(v) end, n)
  local l = best(function() loads(s) end, n)
  print(string.format("%s %.9f %.9f %d %d", name, d, l, #s, n))
end
