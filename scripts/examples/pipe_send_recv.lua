-- Port of the seeds' Pipe example: the child sends a list through its end and closes it.
--   def f(conn):
--       conn.send([42, None, 'hello'])
--       conn.close()
--   parent_conn, child_conn = Pipe()
--   p = Process(target=f, args=(child_conn,)); p.start()
--   print(parent_conn.recv())   # prints "[42, None, 'hello']"
--   p.join()
local luamp = require "luamp"

local function show(t)
  local parts = {}
  for i = 1, t.n do parts[i] = t[i] == nil and "nil" or string.format("%q", t[i]) end
  return "{" .. table.concat(parts, ", ") .. "}"
end

local function f(conn)
  conn:send(table.pack(42, nil, "hello"))
  conn:close()
end

local parent_conn, child_conn = luamp.Pipe()
local p = luamp.Process{target = f, args = {child_conn}}
p:start()
print(show(parent_conn:recv()))   -- prints {42, nil, "hello"}
p:join()
