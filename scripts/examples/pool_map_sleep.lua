-- Port of the first Pool example: `with Pool(5) as p: print(p.map(f, [1, 2, 3]))`, where f
-- sleeps (100 s in the seed; pass seconds as the first argument, default 1) and squares.
-- `<close>` is Python's `with`: the pool is terminated at the end of the scope.
local luamp = require "luamp"
local seconds = tonumber(arg and arg[1]) or 1

local function f(x)
  luamp.sleep(seconds)
  return x * x
end

do
  local p <close> = luamp.Pool(5)
  print(table.concat(p:map(f, {1, 2, 3}), ", "))
end
