-- Lock, RLock, Semaphore, BoundedSemaphore, Event, Condition, Barrier: behaviour within
-- one process and across forked processes.
local H = require "helper"
local luamp = H.luamp

-- Starts fn(...) in a child process.
local function spawn(fn, ...)
  local p = luamp.Process{target = fn, args = table.pack(...)}
  p:start()
  return p
end

-- Joins every process and returns their exit codes.
local function join_all(ps, timeout)
  local codes = {}
  for i, p in ipairs(ps) do
    p:join(timeout or 20)
    codes[i] = p.exitcode
  end
  return codes
end

local function all_zero(codes)
  for i, c in ipairs(codes) do
    if c ~= 0 then return false, "process " .. i .. " exited with " .. tostring(c) end
  end
  return true
end

-- Polls cond() until it holds; fails after `limit` seconds. For waiting on state that
-- another process changes where no event exists to wait on.
local function eventually(cond, limit)
  local deadline = luamp.time() + (limit or 10)
  while not cond() do
    assert(luamp.time() < deadline, "condition not reached in time")
    luamp.sleep(0.002)
  end
end

local function elapsed(fn, ...)
  local t0 = luamp.time()
  local r = table.pack(fn(...))
  return luamp.time() - t0, table.unpack(r, 1, r.n)
end

describe("Lock", function()
  it("acquires, releases and reports its state", function()
    local l = luamp.Lock()
    assert.equal("<Lock locked=false>", tostring(l))
    assert.is_false(l:locked())
    assert.is_true(l:acquire())
    assert.is_true(l:locked())
    assert.truthy(tostring(l):match("^<Lock locked=true owner=%d+>$"))
    l:release()
    assert.is_false(l:locked())
    assert.is_false(l.recovered)
  end)

  it("raises Value when releasing an unheld lock", function()
    local l = luamp.Lock()
    H.raises("Value", l.release, l)
    l:acquire(); l:release()
    H.raises("Value", l.release, l)
  end)

  it("is not recursive: a second acquire fails without blocking or after its timeout", function()
    local l = luamp.Lock()
    l:acquire()
    local t = elapsed(function() assert.is_false(l:acquire(false)) end)
    assert.is_true(t < 0.5)
    local t2, got = elapsed(l.acquire, l, true, 0.15)
    assert.is_false(got)
    assert.is_true(t2 >= 0.149 and t2 < 2, "timeout took " .. t2)
    l:release()
  end)

  it("checks its arguments", function()
    local l = luamp.Lock()
    H.raises("Value", l.acquire, l, "yes")
    H.raises("Value", l.acquire, l, true, "soon")
    H.raises("Value", l.acquire, l, true, 0 / 0)
    H.raises("Value", l.acquire, {})
    H.raises("Value", l.release, 42)
    H.raises("Value", luamp.RLock().acquire, l)   -- a Lock is not an RLock
  end)

  it("acquire and release act on the object they are called on, and check it", function()
    for _, make in ipairs {luamp.Lock, luamp.RLock} do
      local a, b = make(), make()
      assert.is_true(a.acquire(b))             -- as Python's Lock.acquire(b): b is taken
      assert.is_true(b:locked())
      assert.is_false(a:locked())
      a.release(b)
      assert.is_false(b:locked())
      H.raises("Value", a.acquire)             -- no self
      H.raises("Value", a.release)
      H.raises("Value", a.acquire, "a")
      H.raises("Value", a.release, 7)
      H.raises("Value", a.acquire, luamp.Semaphore())
      H.raises("Value", a.release, luamp.Event())
      local copy = setmetatable({}, getmetatable(a))   -- a Lock's fields, not a Lock
      for k, v in pairs(a) do copy[k] = v end
      H.raises("Value", copy.acquire, copy)
      H.raises("Value", copy.release, copy)
      assert.is_false(a:locked())
    end
  end)

  it("methods kept after their lock was collected raise Value for any argument", function()
    for _, make in ipairs {luamp.Lock, luamp.RLock} do
      local l = make()
      local acquire, release = l.acquire, l.release
      l = nil   -- luacheck: ignore
      collectgarbage(); collectgarbage()
      -- new objects may take the collected table's address
      local others = {}
      for i = 1, 200 do others[i] = i % 2 == 0 and {} or ("s" .. i) end
      for _, o in ipairs(others) do
        H.raises("Value", acquire, o)
        H.raises("Value", release, o)
      end
    end
  end)

  it("with returns the function's results and releases, also on error", function()
    local l = luamp.Lock()
    local a, b = l:with(function(x, y)
      assert.is_true(l:locked())
      return x + y, "ok"
    end, 2, 3)
    assert.equal(5, a); assert.equal("ok", b)
    assert.is_false(l:locked())
    local err = {kind = "mine"}
    local ok, e = pcall(l.with, l, function() error(err) end)
    assert.is_false(ok)
    assert.equal(err, e)                      -- the error object itself comes through
    assert.is_false(l:locked())
    H.raises("Value", l.with, l, 42)
  end)

  it("guard releases at scope end and on error", function()
    local l = luamp.Lock()
    do
      local g <close> = l:guard()
      assert.is_true(l:locked())
    end
    assert.is_false(l:locked())
    local ok = pcall(function()
      local g <close> = l:guard()
      error("boom")
    end)
    assert.is_false(ok)
    assert.is_false(l:locked())
  end)

  it("close makes every method raise Value, and is idempotent", function()
    local l = luamp.Lock()
    l:close(); l:close()
    assert.equal("<Lock closed>", tostring(l))
    local e = H.raises("Value", l.acquire, l)
    assert.truthy(e.message:match("closed"))
    H.raises("Value", l.release, l)
  end)

  it("serialises ten processes printing under it without interleaving", function()
    local script = H.script([[
      local luamp = require "luamp"
      local lock, go = luamp.Lock(), luamp.Event()
      local ps = {}
      for i = 1, 10 do
        ps[i] = luamp.Process{target = function()
          go:wait()
          lock:with(function()
            -- one byte at a time: without the lock the lines would mix
            for c in ("hello TTS " .. i .. "\n"):gmatch(".") do
              io.stdout:write(c); io.stdout:flush()
            end
          end)
        end}
        ps[i]:start()
      end
      go:set()
      for i = 1, 10 do ps[i]:join() end
    ]])
    local out, err, code = H.run({script})
    os.remove(script)
    assert.equal(0, code, err)
    local seen = {}
    for line in out:gmatch("[^\n]+") do
      local i = assert(line:match("^hello TTS (%d+)$"), "mixed line: " .. line)
      seen[tonumber(i)] = true
    end
    for i = 1, 10 do assert.is_true(seen[i], "missing line " .. i) end
  end)

  it("keeps 100 processes' increments of a shared Value exact", function()
    local lock, go = luamp.Lock(), luamp.Event()
    local v = luamp.Value("i", 0, {lock = false})
    local ps = {}
    for i = 1, 100 do
      ps[i] = spawn(function()
        go:wait()                      -- all at once, so that they would collide
        lock:acquire()
        local x = v.value
        for _ = 1, 2000 do end         -- a read-modify-write that takes a while
        v.value = x + 1
        lock:release()
      end)
    end
    go:set()
    assert(all_zero(join_all(ps)))
    assert.equal(100, v.value)
  end)

  it("can be released by another process, as in Python", function()
    local l = luamp.Lock()
    l:acquire()
    assert(all_zero(join_all({spawn(function() l:release() end)})))
    assert.is_false(l:locked())
  end)

  it("wakes a process blocked in acquire when released", function()
    local l, started = luamp.Lock(), luamp.Event()
    l:acquire()
    local got = luamp.Value("i", 0)
    local p = spawn(function()
      started:set()
      if l:acquire(true, 10) then got.value = 1 end
      l:release()
    end)
    started:wait()
    l:release()
    assert(all_zero(join_all({p})))
    assert.equal(1, got.value)
  end)

  describe("held by a process that died", function()
    it("is recovered by the next acquire, which sets recovered", function()
      local l, held = luamp.Lock(), luamp.Event()
      local p = spawn(function() l:acquire(); held:set() end)   -- exits holding it
      held:wait()
      local t, got = elapsed(l.acquire, l, true, 10)
      assert.is_true(got)
      assert.is_true(l.recovered)
      assert.is_true(t < 2, "recovery took " .. t)
      assert.truthy(tostring(l):match("owner=" .. luamp.getpid()))
      l:release()
      assert.is_true(l:acquire())      -- an ordinary acquire clears it again
      assert.is_false(l.recovered)
      l:release()
      join_all({p})
    end)

    it("is recovered when its holder is killed while others wait", function()
      local l, held = luamp.Lock(), luamp.Event()
      local p = spawn(function()
        l:acquire(); held:set()
        luamp.Event():wait()           -- never returns
      end)
      held:wait()
      assert.is_false(l:acquire(true, 0.05))
      local w = luamp.Value("i", 0)
      local waiter = spawn(function()
        if l:acquire(true, 10) and l.recovered then w.value = 1 end
      end)
      p:kill()
      assert(all_zero(join_all({waiter})))
      assert.equal(1, w.value)
      join_all({p})
    end)

    it("after the holder was reaped too, and acquire(false) recovers it", function()
      local l = luamp.Lock()
      join_all({spawn(function() l:acquire() end)})
      assert.is_true(l:acquire(false))
      assert.is_true(l.recovered)
      l:release()
    end)
  end)
end)

describe("RLock", function()
  it("may be acquired again by its owner and needs as many releases", function()
    local r = luamp.RLock()
    assert.is_true(r:acquire())
    assert.is_true(r:acquire())
    assert.is_true(r:acquire(false))
    assert.truthy(tostring(r):match("depth=3>$"))
    r:release(); r:release()
    assert.is_true(r:locked())
    r:release()
    assert.is_false(r:locked())
    H.raises("Value", r.release, r)
  end)

  it("cannot be released by a process that does not hold it", function()
    local r = luamp.RLock()
    r:acquire()
    local res = luamp.Value("i", 0)
    local p = spawn(function()
      local ok, e = pcall(r.release, r)
      if not ok and e.kind == "Value" then res.value = 1 end
      if r:acquire(false) == false then res:add(1) end   -- and it is still held
    end)
    assert(all_zero(join_all({p})))
    assert.equal(2, res.value)
    r:release()
  end)

  it("excludes other processes until fully released", function()
    local r, done = luamp.RLock(), luamp.Value("i", 0)
    r:acquire(); r:acquire()
    local p = spawn(function()
      r:acquire(); done.value = 1; r:release()
    end)
    r:release()
    p:join(0.1)
    assert.is_true(p:is_alive())       -- still held once
    assert.equal(0, done.value)
    r:release()
    assert(all_zero(join_all({p})))
    assert.equal(1, done.value)
  end)

  it("held at depth 2 by a dead process is recovered at depth 1", function()
    local r = luamp.RLock()
    join_all({spawn(function() r:acquire(); r:acquire() end)})
    assert.is_true(r:acquire(true, 5))
    assert.is_true(r.recovered)
    r:release()
    assert.is_false(r:locked())
  end)
end)

describe("Semaphore", function()
  it("counts", function()
    local s = luamp.Semaphore(2)
    assert.equal("<Semaphore value=2>", tostring(s))
    assert.is_true(s:acquire()); assert.is_true(s:acquire())
    assert.equal(0, s:get_value())
    assert.is_false(s:acquire(false))
    local t, got = elapsed(s.acquire, s, true, 0.1)
    assert.is_false(got)
    assert.is_true(t >= 0.099 and t < 2)
    s:release(); s:release(); s:release()   -- a plain Semaphore may go above its start
    assert.equal(3, s:get_value())
    s:release(2)
    assert.equal(5, s:get_value())
    assert.equal(1, luamp.Semaphore():get_value())
    assert.equal(0, luamp.Semaphore{value = 0}:get_value())
  end)

  it("rejects bad values", function()
    H.raises("Value", luamp.Semaphore, -1)
    H.raises("Value", luamp.Semaphore, 1.5)
    H.raises("Value", luamp.Semaphore, "2")
    H.raises("Value", luamp.Semaphore(1).release, luamp.Semaphore(1), 0)
  end)

  it("BoundedSemaphore raises Value on over-release", function()
    local s = luamp.BoundedSemaphore(2)
    assert.equal("<BoundedSemaphore value=2 maxvalue=2>", tostring(s))
    H.raises("Value", s.release, s)
    s:acquire()
    s:release()
    H.raises("Value", s.release, s)
    assert.equal(2, s:get_value())
    local g = s:with(function() return s:get_value() end)
    assert.equal(1, g)
  end)

  it("lets at most two of eight processes in at once", function()
    local sem = luamp.Semaphore(2)
    local inside, most = luamp.Value("i", 0), luamp.Value("i", 0)
    local pair = luamp.Barrier(2, nil, 10)   -- the two inside meet before leaving
    local ps = {}
    for i = 1, 8 do
      ps[i] = spawn(function()
        sem:acquire()
        local n = inside:add(1)
        repeat local m = most.value until n <= m or most:cas(m, n)
        pair:wait()
        inside:add(-1)
        sem:release()
      end)
    end
    assert(all_zero(join_all(ps)))
    assert.equal(2, most.value)
    assert.equal(2, sem:get_value())
  end)

  it("wakes a waiting process on release", function()
    local s, got = luamp.Semaphore(0), luamp.Value("i", 0)
    local p = spawn(function() if s:acquire(true, 10) then got.value = 1 end end)
    s:release()
    assert(all_zero(join_all({p})))
    assert.equal(1, got.value)
  end)
end)

describe("Event", function()
  it("sets, clears and waits", function()
    local e = luamp.Event()
    assert.equal("<Event set=false>", tostring(e))
    assert.is_false(e:is_set())
    local t, r = elapsed(e.wait, e, 0.1)
    assert.is_false(r)
    assert.is_true(t >= 0.099 and t < 2)
    e:set()
    assert.is_true(e:is_set())
    assert.is_true(e:wait())
    assert.is_true(e:wait(0))
    e:clear()
    assert.is_false(e:wait(0))
    H.raises("Value", e.wait, e, "x")
  end)

  it("releases every waiting process", function()
    local e, woke = luamp.Event(), luamp.Value("i", 0)
    local ps = {}
    for i = 1, 4 do ps[i] = spawn(function() if e:wait(10) then woke:add(1) end end) end
    e:set()
    assert(all_zero(join_all(ps)))
    assert.equal(4, woke.value)
  end)
end)

describe("Condition", function()
  it("uses a new RLock by default, or the given lock", function()
    local c = luamp.Condition()
    assert.truthy(tostring(c):match("^<Condition lock=<RLock locked=false> waiters=0>$"))
    local l = luamp.Lock()
    local c2 = luamp.Condition(l)
    c2:acquire()
    assert.is_true(l:locked())
    c2:release()
    H.raises("Value", luamp.Condition, {})
    H.raises("Value", luamp.Condition, luamp.Semaphore())
  end)

  it("needs its lock held to wait or notify", function()
    local c = luamp.Condition(luamp.Lock())
    H.raises("Value", c.notify, c)
    H.raises("Value", c.notify_all, c)
    H.raises("Value", c.wait, c, 0)
  end)

  it("wait times out with false and gives the lock back", function()
    local c = luamp.Condition()
    c:with(function()
      local t, r = elapsed(c.wait, c, 0.1)
      assert.is_false(r)
      assert.is_true(t >= 0.099 and t < 2)
    end)
    local r2 = luamp.RLock()
    local c2 = luamp.Condition(r2)
    r2:acquire(); r2:acquire()         -- an RLock held twice is fully released while waiting
    assert.is_false(c2:wait(0.01))
    assert.truthy(tostring(r2):match("depth=2>$"))
    r2:release(); r2:release()
  end)

  it("wait_for returns the predicate's value, or its last value after the timeout", function()
    local c = luamp.Condition()
    c:acquire()
    assert.equal(7, c:wait_for(function() return 7 end))
    local n = 0
    local t, r = elapsed(c.wait_for, c, function() n = n + 1; return false end, 0.1)
    assert.is_false(r)
    assert.is_true(t >= 0.099 and t < 2)
    c:release()
  end)

  it("notify(n) wakes n waiting processes and notify_all the rest", function()
    local c = luamp.Condition()
    local ready, woke = luamp.Value("i", 0), luamp.Value("i", 0)
    local ps = {}
    for i = 1, 3 do
      ps[i] = spawn(function()
        c:acquire()
        ready:add(1)
        local r = c:wait(10)
        woke:add(1)
        c:release()
        assert(r)
      end)
    end
    -- once ready is 3 and we hold the lock, all three are inside wait
    eventually(function() return ready.value == 3 end)
    c:acquire()
    c:notify(1)
    c:release()
    eventually(function() return woke.value == 1 end)
    luamp.sleep(0.05)
    assert.equal(1, woke.value)
    c:with(function() c:notify_all() end)
    assert(all_zero(join_all(ps)))
    assert.equal(3, woke.value)
  end)

  it("over a lock whose holder died recovers it", function()
    local l = luamp.Lock()
    local c = luamp.Condition(l)
    join_all({spawn(function() c:acquire() end)})
    assert.is_true(c:acquire(true, 5))
    assert.is_true(c.recovered)
    assert.is_true(l.recovered)
    assert.is_false(c:wait(0.01))
    c:release()
  end)

  it("closes its own state only", function()
    local l = luamp.Lock()
    local c = luamp.Condition(l)
    c:close(); c:close()
    assert.equal("<Condition closed>", tostring(c))
    H.raises("Value", c.acquire, c)
    assert.is_true(l:acquire()); l:release()
  end)
end)

describe("Barrier", function()
  it("has parties, n_waiting and broken, and checks its arguments", function()
    local b = luamp.Barrier(3)
    assert.equal(3, b.parties)
    assert.equal(0, b.n_waiting)
    assert.is_false(b.broken)
    assert.equal("<Barrier parties=3 waiting=0 broken=false>", tostring(b))
    assert.equal(2, luamp.Barrier{parties = 2, timeout = 1}.parties)
    H.raises("Value", luamp.Barrier, 0)
    H.raises("Value", luamp.Barrier, "3")
    H.raises("Value", luamp.Barrier, 2, 42)
    H.raises("Value", luamp.Barrier, 2, nil, "x")
  end)

  it("gives each process of a generation a distinct index and runs the action once", function()
    local actions = luamp.Value("i", 0)
    local b = luamp.Barrier(3, function() actions:add(1) end)
    local idx = luamp.Array("i", 6)
    local ps = {}
    for i = 1, 2 do
      ps[i] = spawn(function()
        idx[i] = b:wait()
        idx[i + 3] = b:wait()          -- and the barrier can be used again
      end)
    end
    idx[3] = b:wait()
    idx[6] = b:wait()
    assert(all_zero(join_all(ps)))
    for g = 0, 1 do
      local t = {idx[g * 3 + 1], idx[g * 3 + 2], idx[g * 3 + 3]}
      table.sort(t)
      assert.same({0, 1, 2}, t)
    end
    assert.equal(2, actions.value)
    assert.equal(0, b.n_waiting)
  end)

  it("a timeout breaks it for every waiter", function()
    local b = luamp.Barrier(3)
    local broken = luamp.Value("i", 0)
    local p = spawn(function()
      local ok, e = pcall(b.wait, b)   -- no timeout of its own
      if not ok and e.kind == "BrokenBarrier" then broken:add(1) end
    end)
    eventually(function() return b.n_waiting == 1 end)
    local t = elapsed(function() H.raises("BrokenBarrier", b.wait, b, 0.1) end)
    assert.is_true(t >= 0.099 and t < 2)
    assert(all_zero(join_all({p})))
    assert.equal(1, broken.value)
    assert.is_true(b.broken)
    H.raises("BrokenBarrier", b.wait, b, 1)   -- stays broken until reset
    b:reset()
    assert.is_false(b.broken)
  end)

  it("uses its default timeout", function()
    local b = luamp.Barrier(2, nil, 0.05)
    H.raises("BrokenBarrier", b.wait, b)
  end)

  it("abort breaks waiters; reset makes it usable again", function()
    local b = luamp.Barrier(2)
    local broken = luamp.Value("i", 0)
    local p = spawn(function()
      local ok, e = pcall(b.wait, b, 10)
      if not ok and e.kind == "BrokenBarrier" then broken:add(1) end
    end)
    eventually(function() return b.n_waiting == 1 end)
    b:abort()
    assert(all_zero(join_all({p})))
    assert.equal(1, broken.value)
    H.raises("BrokenBarrier", b.wait, b)
    b:reset()
    local q = spawn(function() assert(b:wait(10)) end)
    assert.is_number(b:wait(10))
    assert(all_zero(join_all({q})))
  end)

  it("reset while a process waits raises BrokenBarrier in it", function()
    local b = luamp.Barrier(2)
    local broken = luamp.Value("i", 0)
    local p = spawn(function()
      local ok, e = pcall(b.wait, b, 10)
      if not ok and e.kind == "BrokenBarrier" then broken:add(1) end
    end)
    eventually(function() return b.n_waiting == 1 end)
    b:reset()
    assert(all_zero(join_all({p})))
    assert.equal(1, broken.value)
    assert.is_false(b.broken)
  end)

  it("an action that raises breaks it: the error in the last arrival, BrokenBarrier in others", function()
    local b = luamp.Barrier(2, function() error({kind = "mine"}) end)
    local broken = luamp.Value("i", 0)
    local p = spawn(function()
      local ok, e = pcall(b.wait, b, 10)
      if not ok and e.kind == "BrokenBarrier" then broken:add(1) end
    end)
    eventually(function() return b.n_waiting == 1 end)
    local ok, e = pcall(b.wait, b, 10)
    assert.is_false(ok)
    assert.equal("mine", e.kind)
    assert(all_zero(join_all({p})))
    assert.equal(1, broken.value)
    assert.is_true(b.broken)
  end)

  it("with one party returns at once", function()
    local b = luamp.Barrier(1)
    assert.equal(0, b:wait())
    assert.equal(0, b:wait())
  end)
end)

describe("shared objects", function()
  it("are freed when the last handle goes, counting handles inherited by children", function()
    collectgarbage(); collectgarbage()
    local base = luamp._core.arena_stats().live
    do
      for _ = 1, 2000 do luamp.Lock() end
      collectgarbage(); collectgarbage()
    end
    local s = luamp._core.arena_stats()
    assert.equal(base, s.live)
    local l = luamp.Lock()
    assert.equal(base + 1, luamp._core.arena_stats().live)
    assert(all_zero(join_all({spawn(function() l:close(); collectgarbage() end)})))
    assert.is_true(l:acquire()); l:release()       -- the child's close left ours alone
    assert.equal(base + 1, luamp._core.arena_stats().live)
    local keep = spawn(function() luamp.Event():wait(0.01) end)   -- inherits l too
    join_all({keep})
    l:close()
    collectgarbage()
    assert.equal(base, luamp._core.arena_stats().live)
  end)

  it("leave nothing in /dev/shm", function()
    local before = H.sh("ls /dev/shm | wc -l")
    local l = luamp.Lock()
    join_all({spawn(function() l:acquire(); l:release() end)})
    assert.equal(before, H.sh("ls /dev/shm | wc -l"))
  end)
end)

describe("handles", function()
  local function round_trip(obj)
    local mt = getmetatable(obj)
    local name, payload = mt.__luamp_handle(obj)
    local rebuild = debug.getregistry()["luamp.handles"][name]
    assert.is_function(rebuild, "no handle registered for " .. tostring(name))
    return rebuild(payload), name, payload
  end

  it("rebuild each object onto the same shared state", function()
    local l = luamp.Lock()
    local l2, name = round_trip(l)
    assert.equal("luamp.Lock", name)
    l:acquire()
    assert.is_true(l2:locked())
    H.raises("Value", l2.release, luamp.RLock())
    l2:release()
    assert.is_false(l:locked())

    local s2 = round_trip(luamp.BoundedSemaphore(3))
    assert.equal("<BoundedSemaphore value=3 maxvalue=3>", tostring(s2))
    local e = luamp.Event()
    local e2 = round_trip(e)
    e2:set()
    assert.is_true(e:is_set())
    local r2 = round_trip(luamp.RLock())
    assert.truthy(tostring(r2):match("^<RLock"))

    local c = luamp.Condition()
    local c2 = round_trip(c)
    c2:acquire()
    c2:notify()
    c2:release()

    local b = luamp.Barrier(2, function() end, 5)
    local b2 = round_trip(b)
    assert.equal(2, b2.parties)
    local p = spawn(function() b:wait() end)
    assert.is_number(b2:wait())
    assert(all_zero(join_all({p})))
  end)

  it("reject garbage payloads with Value", function()
    local reg = debug.getregistry()["luamp.handles"]
    local _, payload = getmetatable(luamp.Lock()).__luamp_handle(luamp.Lock())
    H.raises("Value", reg["luamp.Lock"], 42)
    H.raises("Value", reg["luamp.Lock"], {})
    H.raises("Value", reg["luamp.Event"], payload)            -- a Lock is not an Event
    H.raises("Value", reg["luamp.RLock"], payload)            -- nor an RLock
    local bad = {}
    for k, v in pairs(payload) do bad[k] = v end
    bad.off = payload.off + 16
    H.raises("Value", reg["luamp.Lock"], bad)
    bad.off = 0
    H.raises("Value", reg["luamp.Lock"], bad)
    bad.off = 1 << 40
    H.raises("Value", reg["luamp.Lock"], bad)
    bad.off = payload.off; bad.arena = string.rep("0", 32)
    H.raises("Value", reg["luamp.Lock"], bad)
    bad.arena = "x"
    H.raises("Value", reg["luamp.Lock"], bad)
  end)

  it("cross the codec as the same objects", function()
    local l, e = luamp.Lock(), luamp.Event()
    local c = luamp.Condition()
    local b = luamp.Barrier(2, function() end)
    local t = luamp.loads(luamp.dumps({l, l, e, c, b, luamp.RLock(), luamp.Semaphore(4)}),
      {trusted = true})
    assert.equal(t[1], t[2])                  -- shared references stay shared
    l:acquire()
    assert.is_true(t[1]:locked())
    t[1]:release()
    t[3]:set()
    assert.is_true(e:is_set())
    assert.is_true(t[4]:acquire(false))
    assert.equal("<Semaphore value=4>", tostring(t[7]))
    assert.truthy(tostring(t[6]):match("^<RLock"))
    assert.equal(2, t[5].parties)
    local closed = luamp.Lock()
    closed:close()
    H.raises("Serialize", luamp.dumps, closed)
    local bytes = luamp.dumps(luamp.Lock()):gsub("luamp%.Lock", "luamp.Evnt")
    local ok, err = pcall(luamp.loads, bytes, {trusted = true})
    assert.is_false(ok)
    assert.equal("Serialize", err.kind)
  end)

  it("sent as bytes to a child process reach the same objects", function()
    local l, done = luamp.Lock(), luamp.Event()
    local msg = luamp.dumps({lock = l, done = done})
    l:acquire()
    local p = spawn(function()
      local t = luamp.loads(msg, {trusted = true})
      assert(t.lock:acquire(false) == false)
      t.lock:release()
      t.done:set()
    end)
    assert.is_true(done:wait(10))
    assert(all_zero(join_all({p})))
    assert.is_false(l:locked())
  end)

  it("attach from an unrelated (exec'd) process through /proc", function()
    local l = luamp.Lock()
    local _, payload = getmetatable(l).__luamp_handle(l)
    l:acquire()
    local script = H.script(string.format([[
      local luamp = require "luamp"
      local _ = luamp.Lock      -- the part that registers the handle type loads on first use
      local rebuild = debug.getregistry()["luamp.handles"]["luamp.Lock"]
      local l = rebuild{arena = %q, pid = %d, fd = %d, off = %d, gen = %d}
      io.write(tostring(l:acquire(false)), " ")
      l:release()                       -- a Lock may be released by anyone
      io.write(tostring(l:acquire(false)))
    ]], payload.arena, payload.pid, payload.fd, payload.off, payload.gen))
    local out, err, code = H.run({script})
    os.remove(script)
    assert.equal(0, code, err)
    assert.equal("false true", out)
    assert.is_true(l:locked())
    l:release()
  end)

  it("decoded by an exec'd process from luamp.dumps bytes", function()
    local e, sem = luamp.Event(), luamp.Semaphore(0)
    local path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    f:write(luamp.dumps({e, sem}))
    f:close()
    local script = H.script(string.format([[
      local luamp = require "luamp"
      local f = assert(io.open(%q, "rb"))
      local t = luamp.loads(f:read("a"), {trusted = true})
      f:close()
      t[1]:set()
      t[2]:release(3)
      io.write(tostring(t[1]))
    ]], path))
    local out, err, code = H.run({script})
    os.remove(script); os.remove(path)
    assert.equal(0, code, err)
    assert.equal("<Event set=true>", out)
    assert.is_true(e:is_set())
    assert.equal(3, sem:get_value())
  end)
end)

describe("Ctrl-C in the luamp host", function()
  local P = require "pty"

  local function session(src, steps)
    local path = H.script(src)
    local ok, transcript = P.session({path}, steps)
    os.remove(path)
    assert(ok, transcript)
  end

  it("interrupts a blocked acquire, and a Condition wait with its lock held again", function()
    session([[
      local l = luamp.Lock(); l:acquire()
      local ok, e = pcall(function() io.write("ready\n") io.flush() l:acquire() end)
      print("lock", e.kind)
      local c = luamp.Condition(); c:acquire()
      ok, e = pcall(function() io.write("again\n") io.flush() c:wait() end)
      c:release()                     -- raises if the wait had not taken the lock back
      print("cond", e.kind)
      os.exit(3)
    ]], {P.expect("ready"), P.signal("INT"), P.expect("lock\tInterrupted"),
         P.expect("again"), P.signal("INT"), P.expect("cond\tInterrupted"), P.exit(3)})
  end)

  it("interrupts Semaphore, Event and Barrier waits", function()
    session([[
      local waits = {
        function() luamp.Semaphore(0):acquire() end,
        function() luamp.Event():wait() end,
        function() luamp.Barrier(2):wait() end,
      }
      for i, w in ipairs(waits) do
        local ok, e = pcall(function() io.write("ready", i, "\n") io.flush() w() end)
        print("got", e.kind)
      end
      os.exit(3)
    ]], {P.expect("ready1"), P.signal("INT"), P.expect("got\tInterrupted"),
         P.expect("ready2"), P.signal("INT"), P.expect("got\tInterrupted"),
         P.expect("ready3"), P.signal("INT"), P.expect("got\tInterrupted"), P.exit(3)})
  end)
end)
