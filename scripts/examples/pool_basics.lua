-- Port of the Pool tour: map, imap_unordered, apply_async with get(timeout), getpid in
-- the workers, and a get that runs out of patience. (The seed's last task sleeps 10 s;
-- pass seconds as the first argument.)
local luamp = require "luamp"
local seconds = tonumber(arg and arg[1]) or 10

local function f(x) return x * x end

local function range(n)
  local t = {}
  for i = 0, n - 1 do t[#t + 1] = i end
  return t
end

local pool <close> = luamp.Pool{processes = 4}

-- [0, 1, 4, ..., 81]
print(table.concat(pool:map(f, range(10)), ", "))

-- the same numbers, in whatever order the workers finish them
for i in pool:imap_unordered(f, range(10)) do print(i) end

-- evaluate f(20) asynchronously: 400
local res = pool:apply_async(f, {20})
print(res:get(1))

-- the pid of a worker
res = pool:apply_async(luamp.getpid, {})
print(res:get(1))

-- several asynchronous evaluations may use more workers
local multiple_results = {}
for i = 1, 4 do multiple_results[i] = pool:apply_async(luamp.getpid, {}) end
local pids = {}
for i, r in ipairs(multiple_results) do pids[i] = r:get(1) end
print(table.concat(pids, ", "))

-- make a single worker sleep, and do not wait for it
res = pool:apply_async(luamp.sleep, {seconds})
local ok, err = pcall(res.get, res, 1)
if not ok and err.kind == luamp.errors.Timeout then
  print("We lacked patience and got a luamp.Timeout")
end
