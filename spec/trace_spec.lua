-- A picture of a run: LUAMP_TRACE and luamp.trace_start/trace_stop write a Chrome
-- trace-event JSON file with a row per child, a span per task chunk and instant events.
local H = require "helper"
local luamp = H.luamp
-- Task functions carry their _ENV: it must be the real global table, not busted's sandbox.
local describe, it, assert = describe, it, assert
local _ENV = _G

-- Parses the file with Python's json module and returns a summary as Lua values:
-- spans (list of {name, tid, items, chunk, dur}), waits (list of {name, tid, dur}, dur in
-- microseconds), instants (list of {name, tid}), rows (tid -> name).
local function summary(path)
  local py = [[
import json, sys
d = json.load(open(sys.argv[1]))
for e in d["traceEvents"]:
    a = e.get("args", {})
    if e["ph"] == "X" and e.get("cat") == "wait":
        print("W", e["tid"], e["dur"], e["name"].replace(" ", "_"))
    elif e["ph"] == "X":
        print("X", e["tid"], a["items"], a["chunk"], e["dur"], e["name"].replace(" ", "_"))
    elif e["ph"] == "i":
        print("i", e["tid"], e["name"])
    elif e["ph"] == "M" and e["name"] == "thread_name":
        print("M", e["tid"], a["name"].split(" ")[0])
]]
  local out, code = H.sh("python3 -c " .. H.q(py) .. " " .. H.q(path))
  assert.equal(0, code, "the trace does not parse as JSON")
  local s = {spans = {}, waits = {}, instants = {}, rows = {}}
  for line in out:gmatch("[^\n]+") do
    local w = {}
    for x in line:gmatch("%S+") do w[#w + 1] = x end
    if w[1] == "X" then
      s.spans[#s.spans + 1] = {tid = tonumber(w[2]), items = tonumber(w[3]), chunk = tonumber(w[4]),
                               dur = tonumber(w[5]), name = w[6]}
    elseif w[1] == "W" then
      s.waits[#s.waits + 1] = {tid = tonumber(w[2]), dur = tonumber(w[3]), name = w[4]}
    elseif w[1] == "i" then
      s.instants[#s.instants + 1] = {tid = tonumber(w[2]), name = w[3]}
    else
      s.rows[tonumber(w[2])] = w[3]
    end
  end
  return s
end

local function count(list, name)
  local n = 0
  for _, e in ipairs(list) do if e.name == name then n = n + 1 end end
  return n
end

describe("LUAMP_TRACE", function()
  it("writes one span per task chunk, a row per worker and process events", function()
    local trace = os.tmpname()
    local script = H.script([[
local pool <close> = luamp.Pool(2)
function square(x) return x * x end
local r = pool:map(square, {1, 2, 3, 4, 5, 6, 7}, {chunksize = 2})
assert(#r == 7)
pool:map(function(x) return x end, {1, 2, 3})
local p = luamp.Process{target = function() end}
p:start() p:join()
]])
    local err, code = H.sh(string.format("LUAMP_TRACE=%s %s %s 2>&1", H.q(trace), H.q(H.host), H.q(script)))
    os.remove(script)
    assert.equal(0, code, err)
    local s = summary(trace)
    os.remove(trace)
    -- 7 items in chunks of 2 is 4 chunks; then 3 chunks of 1
    assert.equal(7, #s.spans)
    local items = 0
    for _, sp in ipairs(s.spans) do
      items = items + sp.items
      assert.truthy(s.rows[sp.tid] and s.rows[sp.tid]:find("^PoolWorker%-"), "a span on a worker's row")
      assert.truthy(sp.dur >= 0)
    end
    assert.equal(10, items)
    -- spans are named after the task's function: its global name and where it is defined
    local squares = 0
    for _, sp in ipairs(s.spans) do
      if sp.name == "square_(" .. script .. ":2)" then squares = squares + 1 end
    end
    assert.equal(4, squares)
    -- worker and process start/exit
    assert.truthy(count(s.instants, "start") >= 3)
    assert.truthy(count(s.instants, "exit") >= 3)
    local named = 0
    for _, label in pairs(s.rows) do if label:find("^Process%-") then named = named + 1 end end
    assert.equal(1, named)
  end)
end)

describe("trace of waits", function()
  it("has a span for each lock and queue wait over 1 ms, none for a fast acquire", function()
    local trace = os.tmpname()
    -- The child holds the lock ~50 ms once the parent may block on it, and puts on the
    -- queue ~50 ms after it sees the parent blocked in get.
    local script = H.script([[
local lock, q, held = luamp.Lock(), luamp.Queue(), luamp.Event()
local p = luamp.Process{target = function()
  lock:acquire()
  held:set()
  luamp.sleep(0.05)
  lock:release()
  while q:_waiters("get") == 0 do luamp.sleep(0.001) end
  luamp.sleep(0.05)
  q:put("done")
end}
p:start()
held:wait()
lock:acquire()
lock:release()
assert(q:get() == "done")
p:join()
local fast = luamp.Lock()
fast:acquire()
fast:release()
]])
    local err, code = H.sh(string.format("LUAMP_TRACE=%s %s %s 2>&1", H.q(trace), H.q(H.host), H.q(script)))
    os.remove(script)
    assert.equal(0, code, err)
    local s = summary(trace)
    os.remove(trace)
    local main
    for tid, label in pairs(s.rows) do if label == "main" then main = tid end end
    local by_name = {}
    for _, w in ipairs(s.waits) do
      assert.equal(main, w.tid, "a wait on the main row")
      assert.truthy(w.dur >= 1000, "a wait span is at least the 1 ms threshold")
      by_name[w.name] = (by_name[w.name] or 0) + 1
    end
    -- one each: the fast acquire of another lock left no span
    assert.equal(1, by_name["Lock.acquire_wait"])
    assert.equal(1, by_name["Queue.get_wait"])
    assert.is_nil(by_name["Queue.put_wait"])
  end)

  it("puts the plain C methods back when tracing stops", function()
    local lock, q = luamp.Lock(), luamp.Queue()
    -- a Lock's own acquire takes a free lock; its waits go through the methods table's
    local methods = getmetatable(lock).__index
    local acquire, get = methods.acquire, q.get
    local trace = os.tmpname()
    luamp.trace_start(trace)
    assert.are_not.equal(acquire, methods.acquire)
    assert.are_not.equal(get, q.get)
    lock:acquire() lock:release()
    luamp.trace_stop()
    os.remove(trace)
    assert.equal(acquire, methods.acquire)
    assert.equal(get, q.get)
    q:close() lock:close()
  end)
end)

describe("luamp.trace_start / trace_stop", function()
  it("record only between start and stop, and mark WorkerLost and timeouts", function()
    local pool <close> = luamp.Pool(1)
    pool:map(function(x) return x end, {1, 2, 3})        -- not traced
    local trace = os.tmpname()
    luamp.trace_start(trace)
    pool:map(function(x) return x + 1 end, {1, 2, 3})
    local lost = pool:apply_async(function() os.exit(3) end)
    assert.equal("WorkerLost", select(2, pcall(lost.get, lost)).kind)
    local slow = pool:apply_async(function() luamp.sleep(0.3) return 1 end)
    assert.equal("Timeout", select(2, pcall(slow.get, slow, 0)).kind)
    slow:get()
    assert.equal(trace, luamp.trace_stop())
    assert.is_nil(luamp.trace_stop())
    pool:map(function(x) return x end, {1, 2})           -- not traced
    local s = summary(trace)
    os.remove(trace)
    assert.equal(4, #s.spans)                          -- 3 map chunks and the slow task
    assert.equal(1, count(s.instants, "WorkerLost"))
    assert.equal(1, count(s.instants, "Timeout"))
  end)

  it("refuses a missing path", function()
    H.raises("Value", luamp.trace_start)
  end)
end)

describe("LUAMP_TRACE under the spawn and forkserver start methods", function()
  -- The trace belongs to the program started with LUAMP_TRACE: a spawn child (or a
  -- forkserver) inherits the variable but neither records nor writes the file, which the
  -- program writes at its exit.
  for _, method in ipairs{"spawn", "forkserver"} do
    it("is written by the program only, not by a " .. method .. " child", function()
      local trace = os.tmpname()
      os.remove(trace)
      local script = H.script(string.format([[
luamp.set_start_method(%q)
for _ = 1, 2 do
  local p = luamp.Process{target = function() end}
  p:start() p:join()
  assert(p.exitcode == 0, "exit code " .. tostring(p.exitcode))
end
local f = io.open(os.getenv("LUAMP_TRACE"))
if f then f:close() io.stderr:write("a child wrote the trace file\n") os.exit(3) end
]], method))
      local err, code = H.sh(string.format("LUAMP_TRACE=%s %s %s 2>&1", H.q(trace), H.q(H.host), H.q(script)))
      os.remove(script)
      local s = code == 0 and summary(trace)
      os.remove(trace)
      assert.equal(0, code, err)
      local named = 0
      for _, label in pairs(s.rows) do if label:find("^Process%-") then named = named + 1 end end
      assert.equal(2, named)
      assert.equal(2, count(s.instants, "start"))
      assert.equal(2, count(s.instants, "exit"))
    end)
  end
end)
