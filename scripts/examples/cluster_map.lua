-- cluster_map.lua: a map spread over every machine that runs a `luamp worker`.
--
-- On the machine with Redis (any Redis >= 6.2; bind it to an address the workers reach,
-- and give it a password with `requirepass`):
--     redis-server --bind 10.0.0.5 --requirepass 'redis-pass' --save '' --appendonly no
-- On each worker machine (as many as you like, joining and leaving at any time):
--     luamp worker --broker redis://:redis-pass@10.0.0.5:6379/0 --queue primes \
--                  --authkey s3cret --processes 8
-- Then, anywhere:
--     luamp scripts/examples/cluster_map.lua redis://:redis-pass@10.0.0.5:6379/0 s3cret
-- The authkey signs every task and result: workers refuse messages without it.
local luamp = require "luamp"

local url = arg[1] or "redis://127.0.0.1:6379/0"
local authkey = arg[2] or os.getenv("LUAMP_AUTHKEY") or "s3cret"
local n = tonumber(arg[3]) or 20000

-- The task: count the primes below x (closures and their upvalues travel too).
local function is_prime(k)
  if k < 2 then return false end
  for d = 2, math.floor(math.sqrt(k)) do
    if k % d == 0 then return false end
  end
  return true
end
local function primes_below(x)
  local c = 0
  for k = 2, x - 1 do if is_prime(k) then c = c + 1 end end
  return c
end

local pool <close> = luamp.Pool{broker = url, queue = "primes", authkey = authkey, lease = 30}
local inputs = {}
for i = 1, 100 do inputs[i] = i * n // 100 end

local t0 = luamp.time()
local counts = pool:map(primes_below, inputs, 5)
print(string.format("primes below %d: %d (100 tasks in %.2f s)", n, counts[100], luamp.time() - t0))

-- Results as they come, from whichever worker finishes first:
for count, i in pool:imap_unordered(primes_below, {1000, 2000, 3000}) do
  print(string.format("primes below %d: %d", i * 1000, count))
end
