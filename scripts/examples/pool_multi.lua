-- Port of the "a pool gives you the results back" example: map, map_async():get(),
-- imap_unordered, apply_async with and without a timeout, getpid, and a timeout that
-- runs out. (The last task sleeps 10 s in the seed; pass seconds as the first argument.)
local luamp = require "luamp"
local seconds = tonumber(arg and arg[1]) or 10

local function multi(x) return x + 42 end

local function range(n)
  local t = {}
  for i = 0, n - 1 do t[#t + 1] = i end
  return t
end

local pool <close> = luamp.Pool()

print(table.concat(pool:map(multi, range(10)), ", "))
print(table.concat(pool:map_async(multi, range(10)):get(), ", "))

local out = {}
for i in pool:imap_unordered(multi, range(10)) do out[#out + 1] = i end
print(table.concat(out, " "))

local res = pool:apply_async(multi, {20})
print(res:get(20))

res = pool:apply_async(luamp.getpid)
print(res:get())

local multiple_results = {}
for i = 1, 4 do multiple_results[i] = pool:apply_async(luamp.getpid) end
local pids = {}
for i, r in ipairs(multiple_results) do pids[i] = r:get() end
print(table.concat(pids, ", "))

res = pool:apply_async(luamp.sleep, {seconds})
local ok, err = pcall(res.get, res, 1)
if ok then
  print(err)
elseif err.kind == luamp.errors.Timeout then
  print("we lacked patience and got a timeout error")
else
  error(err, 0)
end
