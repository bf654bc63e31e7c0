-- luamp.wait on anything: AsyncResults and Popen objects mixed with connections and
-- sentinels; active_children lists pool workers; pool:pids().
local H = require "helper"
local luamp = H.luamp
-- Task functions carry their _ENV: it must be the real global table, not busted's sandbox.
local describe, it, setup, teardown, assert = describe, it, setup, teardown, assert
local _ENV = _G

describe("luamp.wait", function()
  local pool
  setup(function() pool = luamp.Pool(2) end)
  teardown(function() pool:terminate() end)

  it("returns the AsyncResults that are ready, and only those", function()
    local ev = luamp.Event()
    local held = pool:apply_async(function(e) e:wait() return "held" end, {ev})
    local quick = pool:apply_async(function() return "quick" end)
    local r = luamp.wait({held, quick})
    assert.equal(1, #r)
    assert.equal(quick, r[1])
    assert.same({}, luamp.wait({held}, 0))
    ev:set()
    assert.equal(held, luamp.wait({held})[1])
    r = luamp.wait({held, quick}, 0)
    assert.equal(2, #r)
    assert.equal(held, r[1])
    assert.equal("held", held:get())
  end)

  it("lists a result once when it was ready before the wait and a pool fd fires in it", function()
    -- quick is ready before the wait; its worker (maxtasksperchild = 1) has exited
    -- unreaped, so its sentinel fires in the wait's poll, which runs the pool and looks
    -- at every result again
    local p <close> = luamp.Pool{processes = 2, maxtasksperchild = 1}
    local quick = p:apply_async(function() return luamp.getpid() end)
    local pid = quick:get(10)
    local deadline = os.time() + 10
    while true do
      local f = io.open("/proc/" .. pid .. "/stat")
      local st = f and f:read("a"):match("^%d+ %b() (%a)")
      if f then f:close() end
      if st == nil or st == "Z" then break end
      assert.is_true(os.time() < deadline, "worker " .. pid .. " never exited")
    end
    local ev = luamp.Event()
    local held = p:apply_async(function(e) e:wait() return "held" end, {ev})
    local r = luamp.wait({quick, held})
    assert.equal(1, #r)
    assert.equal(quick, r[1])
    ev:set()
    assert.equal("held", held:get(10))
  end)

  it("waits on map results too, and honours the timeout", function()
    local ev = luamp.Event()
    local m = pool:map_async(function(x) ev:wait() return x end, {1, 2})
    local t0 = luamp.time()
    assert.same({}, luamp.wait({m}, 0.05))
    assert.truthy(luamp.time() - t0 >= 0.05)
    ev:set()
    assert.equal(m, luamp.wait({m})[1])
    local got = m:get()
    assert.equal(1, got[1]); assert.equal(2, got[2])
  end)

  it("mixes AsyncResults, Popen objects, connections and sentinels", function()
    local a, b = luamp.Pipe()
    local child = luamp.subprocess.Popen({"sleep", "30"})
    assert.equal("integer", math.type(child.sentinel))
    local ev = luamp.Event()
    local held = pool:apply_async(function(e) e:wait() return 1 end, {ev})
    local proc = luamp.Process{target = function(e) e:wait() end, args = {ev}}
    proc:start()
    local list = {held, child, b, proc.sentinel}
    assert.same({}, luamp.wait(list, 0))
    a:send("hi")
    local r = luamp.wait(list)
    assert.equal(1, #r); assert.equal(b, r[1])
    b:recv()
    child:kill()
    r = luamp.wait(list)
    assert.equal(1, #r); assert.equal(child, r[1])
    assert.equal(-9, child:wait())
    -- a finished Popen stays ready, also one whose sentinel is first asked for after it
    -- was reaped
    assert.equal(child, luamp.wait({child}, 0)[1])
    local done = luamp.subprocess.Popen({"true"})
    assert.equal(0, done:wait())
    assert.equal(done, luamp.wait({done}, 0)[1])
    ev:set()
    r = luamp.wait({held, proc.sentinel})
    while #r < 2 do r = luamp.wait({held, proc.sentinel}) end
    assert.same({held, proc.sentinel}, r)
    proc:join()
  end)
end)

describe("pool workers", function()
  it("are listed by active_children and pool:pids()", function()
    local pool <close> = luamp.Pool(3)
    local pids = pool:pids()
    assert.equal(3, #pids)
    local listed = {}
    for _, c in ipairs(luamp.active_children()) do
      if tostring(c):find("PoolWorker", 1, true) then
        listed[#listed + 1] = c.pid
        assert.truthy(c.name:find("^PoolWorker%-%d+$"), c.name)
        assert.is_true(c.is_alive())
        assert.equal("integer", math.type(c.sentinel))
      end
    end
    table.sort(listed)
    local sorted = {table.unpack(pids)}
    table.sort(sorted)
    assert.same(sorted, listed)
    -- the pids are the processes that run the tasks
    local seen = pool:map(function() return luamp.getpid() end, {1, 2, 3, 4, 5, 6})
    for _, pid in ipairs(seen) do
      local found = false
      for _, q in ipairs(pids) do found = found or q == pid end
      assert.is_true(found)
    end
    pool:terminate()
    for _, c in ipairs(luamp.active_children()) do
      assert.falsy(tostring(c):find("PoolWorker", 1, true))
    end
    assert.same({}, pool:pids())
  end)
end)
