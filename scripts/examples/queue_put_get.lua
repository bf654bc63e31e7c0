-- Port of the seeds' first Queue example: a child puts a list, the parent gets it.
--   def f(q):
--       q.put([42, None, 'hello'])
--   q = Queue(); p = Process(target=f, args=(q,)); p.start()
--   print(q.get())    # prints "[42, None, 'hello']"
--   p.join()
-- A Lua list with a hole keeps its length in n (as table.pack makes it).
local luamp = require "luamp"

local function show(t)
  local parts = {}
  for i = 1, t.n do parts[i] = t[i] == nil and "nil" or string.format("%q", t[i]) end
  return "{" .. table.concat(parts, ", ") .. "}"
end

local function f(q)
  q:put(table.pack(42, nil, "hello"))
end

local q = luamp.Queue()
local p = luamp.Process{target = f, args = {q}}
p:start()
print(show(q:get()))    -- prints {42, nil, "hello"}
p:join()
