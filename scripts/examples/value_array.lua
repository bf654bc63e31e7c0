-- Port of the seeds' Value/Array example: a child process writes a shared number and
-- negates a shared array; the parent sees both changes.
--   def decrease(n, a):
--       n.value = 3.1415927
--       for i in range(len(a)): a[i] = -a[i]
--   num = multiprocessing.Value('d', 0.0); arr = multiprocessing.Array('i', range(10))
local luamp = require "luamp"

local function decrease(n, a)
  n.value = 3.1415927
  for i = 1, #a do a[i] = -a[i] end
end

local num = luamp.Value("d", 0.0)
local arr = luamp.Array("i", {0, 1, 2, 3, 4, 5, 6, 7, 8, 9})

local p = luamp.Process{target = decrease, args = {num, arr}}
p:start()
p:join()

print(num.value)
print(table.concat(arr:totable(), ", "))
