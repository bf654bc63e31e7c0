-- Fan in results from two pools and a queue: three tasks, each waiting on its own
-- source, gathered as they come.
local luamp = require "luamp"

local squares <close> = luamp.Pool(2)
local cubes <close> = luamp.Pool(2)
local events = luamp.Queue()
local producer = luamp.Process{target = function()
  for i = 1, 3 do events:put("event " .. i) end
  events:put("done")
end}
producer:start()

local got = {}
local function gather(source, value)
  got[source] = got[source] or {}
  table.insert(got[source], value)
end

luamp.task(function()
  for r in squares:imap(function(x) return x * x end, {1, 2, 3, 4, 5}) do gather("squares", r) end
end)
luamp.task(function()
  local r = cubes:map_async(function(x) return x * x * x end, {1, 2, 3, 4, 5})
  for _, v in ipairs(r:get()) do gather("cubes", v) end
end)
luamp.task(function()
  while true do
    local e = events:get()
    if e == "done" then break end
    gather("queue", e)
  end
  producer:join()
end)

luamp.run()
for _, source in ipairs({"squares", "cubes", "queue"}) do
  print(source, table.concat(got[source], " "))
end
