-- Port of "Sample3: hire a bunch of workers": apply_async, map, stepping through imap
-- with it:next([timeout]), and a get(timeout) that raises Timeout. (The last task sleeps
-- 10 s in the seed; pass seconds as the first argument.)
local luamp = require "luamp"
local seconds = tonumber(arg and arg[1]) or 10

local function f(x) return x * x end

local function range(n)
  local t = {}
  for i = 0, n - 1 do t[#t + 1] = i end
  return t
end

local pool <close> = luamp.Pool{processes = 4}     -- start 4 worker processes

local result = pool:apply_async(f, {10})           -- evaluate f(10) asynchronously
print(result:get(1))                               -- 100 unless your computer is *very* slow

print(table.concat(pool:map(f, range(10)), ", "))  -- 0, 1, 4, ..., 81

local it = pool:imap(f, range(10))
local v = it:next()                                -- next() also returns the input index
print(v)                                           -- 0
v = it:next()
print(v)                                           -- 1
v = it:next(1)
print(v)                                           -- 4 unless your computer is *very* slow

result = pool:apply_async(luamp.sleep, {seconds})
print(pcall(result.get, result, 1))                -- false  luamp.Timeout: ...
