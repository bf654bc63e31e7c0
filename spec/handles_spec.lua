-- Handles travel everywhere (issue 10): a luamp object works in any luamp process that
-- receives it, not only in processes that inherited it by fork. The first cases are
-- Python's best-known multiprocessing gotchas ("Queue objects should only be shared
-- between processes through inheritance").
local H = require "helper"
local luamp = H.luamp
local core = luamp._core

local start = H.start
-- Functions sent to pool workers must not reach busted's environment through _ENV:
-- the globals they use are locals here (standard functions cross by name).
local collectgarbage, io = collectgarbage, io

local fd_count = H.fd_count

-- An object that crosses the codec as whatever handle `hook` describes: a forger.
local function forged(type_name, payload)
  return setmetatable({}, {__luamp_handle = function() return type_name, payload end})
end

describe("handles", function()
  it("a Queue made after the Pool reaches its workers", function()
    local pool = luamp.Pool(2)
    local q = luamp.Queue()
    local pid = pool:apply(function(qq)
      qq:put("from a worker that never inherited the queue")
      return luamp.getpid()
    end, {q})
    assert.equal("from a worker that never inherited the queue", q:get(true, 10))
    assert.is_not.equal(luamp.getpid(), pid)
    -- and through map, many at once, each back in the same queue
    local n = 20
    pool:map(function(a) a[1]:put(a[2] * 2) end, (function()
      local t = {}
      for i = 1, n do t[i] = {q, i} end
      return t
    end)())
    local sum = 0
    for _ = 1, n do sum = sum + q:get(true, 10) end
    assert.equal(n * (n + 1), sum)
    pool:close(); pool:join()
  end)

  it("a Lock sent through a Queue is the same lock in a process started before it", function()
    local carrier, back = luamp.Queue(), luamp.Queue()
    local p = start(function()
      local lock = carrier:get()
      back:put(lock:acquire(false))        -- the parent holds it: false
      back:put(lock:acquire(true, 10))     -- true once the parent lets go
      lock:release()
    end)
    local lock = luamp.Lock()              -- made after the child started
    lock:acquire()
    carrier:put(lock)
    assert.is_false(back:get(true, 10))
    lock:release()
    assert.is_true(back:get(true, 10))
    p:join()
    assert.equal(0, p.exitcode)
    assert.is_true(lock:acquire(false))
    lock:release()
  end)

  it("a Value made in a worker comes back as a Pool result and outlives the worker", function()
    local pool = luamp.Pool(1)
    local v = pool:apply(function()
      local v = luamp.Value("i", 41)
      v:add(1)
      return v
    end)
    assert.equal(42, v.value)
    -- the same shared number, seen from the worker again
    assert.equal(43, pool:apply(function(vv) return vv:add(1) end, {v}))
    pool:close(); pool:join()
    collectgarbage(); collectgarbage()
    assert.equal(43, v.value)
    v:get_lock():with(function() v.value = v.value + 1 end)
    assert.equal(44, v.value)
  end)

  it("an object put in a Queue by a process that has since exited still reaches the getter", function()
    local carrier = luamp.Queue()
    local p = start(function()
      local v = luamp.Value("q", 7)           -- made in the child's own arena
      local l = luamp.Lock()
      carrier:put({v, l})
    end)
    p:join()                                -- the sender is gone before anyone decodes
    assert.equal(0, p.exitcode)
    local t = carrier:get(true, 10)
    assert.equal(7, t[1].value)
    t[1]:add(1)
    assert.is_true(t[2]:acquire(false))
    assert.equal(8, t[1].value)
  end)

  it("a SharedMemory reaches an already-running process through a Pipe", function()
    local a, b = luamp.Pipe()
    local p = start(function()
      local shm = a:recv()
      a:send(shm:read(1, 5))
      shm:write(1, "HELLO")
      a:send(true)
    end)
    local shm = luamp.SharedMemory{create = true, size = 4096}
    shm:write(1, "hello")
    b:send(shm)
    assert.is_true(b:poll(30), "the child did not answer")
    assert.equal("hello", b:recv())
    assert.is_true(b:poll(30), "the child did not answer")
    assert.is_true(b:recv())
    assert.equal("HELLO", shm:read(1, 5))
    p:join()
    shm:close(); shm:unlink()
  end)

  it("Conditions, Barriers, Events and JoinableQueues all reach a late process", function()
    local carrier, back = luamp.Queue(), luamp.Queue()
    local p = start(function()
      local t = carrier:get()
      t.ev:set()
      t.cond:with(function() t.cond:notify() end)
      back:put(t.bar:wait(10))
      local item = t.jq:get(); t.jq:task_done()
      back:put(item)
    end)
    local t = {ev = luamp.Event(), cond = luamp.Condition(), bar = luamp.Barrier(2),
               jq = luamp.JoinableQueue()}
    t.cond:acquire()
    carrier:put(t)
    assert.is_true(t.ev:wait(10))
    assert.is_true(t.cond:wait(10))
    t.cond:release()
    assert.is_number(t.bar:wait(10))
    t.jq:put("job")
    assert.is_true(t.jq:join(10))
    assert.is_number(back:get(true, 10))
    assert.equal("job", back:get(true, 10))
    p:join()
    assert.equal(0, p.exitcode)
  end)

  it("decoded in the process it came from, a handle is the very same object", function()
    local a, b = luamp.Pipe()
    local carrier = luamp.Queue()
    local objs = {luamp.Queue(), luamp.SimpleQueue(), luamp.JoinableQueue(), luamp.Lock(),
                  luamp.RLock(), luamp.Semaphore(2), luamp.Event(), luamp.Condition(),
                  luamp.Barrier(2), luamp.Value("d", 1.5), luamp.Array("i", 3), a}
    for i, o in ipairs(objs) do
      b:send(o)
      assert.equal(o, a:recv(), "through a Pipe: " .. i)
      carrier:put(o)
      assert.equal(o, carrier:get(), "through a Queue: " .. i)
      assert.equal(o, core.loadx(core.dumpx(o)), "through dumpx: " .. i)
    end
    -- twice in one message: one object
    b:send({objs[1], objs[1], objs[4]})
    local t = a:recv()
    assert.equal(objs[1], t[1]); assert.equal(t[1], t[2]); assert.equal(objs[4], t[3])
  end)

  it("a handle received twice in another process is one object there too", function()
    local a, b = luamp.Pipe()
    local p = start(function()
      local q1 = a:recv()
      local q2 = a:recv()
      local l1, l2 = a:recv(), a:recv()
      a:send(q1 == q2 and l1 == l2)
    end)
    local q, l = luamp.Queue(), luamp.Lock()
    b:send(q); b:send(q); b:send(l); b:send(l)
    assert.is_true(b:poll(30), "the child did not answer")
    assert.is_true(b:recv())
    p:join()
  end)

  it("forged and stale handles raise Value naming the kind and leave the transport usable", function()
    local a, b = luamp.Pipe()
    local carrier = luamp.Queue()
    local function check(v, kind, pattern)
      b:send(v)
      local err = H.raises("Serialize", a.recv, a)
      assert.truthy(tostring(err):find(kind, 1, true), tostring(err))
      if pattern then assert.truthy(tostring(err):find(pattern, 1, true), tostring(err)) end
      b:send("still usable")
      assert.equal("still usable", a:recv())
      carrier:put(v)
      err = H.raises("Serialize", carrier.get, carrier)
      assert.truthy(tostring(err):find(kind, 1, true), tostring(err))
      carrier:put("still usable")
      assert.equal("still usable", carrier:get())
    end
    -- descriptors that never came
    check(forged("luamp.Queue", {carried = true, fd = 0, efd = {1, 2}, sfd = 3}), "Queue", "did not arrive")
    check(forged("luamp.Connection", {carried = true, fdi = 5}), "Connection", "did not arrive")
    -- a descriptor of the wrong kind: a socket where the queue's memfd should be
    local x, y = luamp.Pipe()
    check({forged("luamp.Queue", {carried = true, fd = 0, efd = {0, 0}, sfd = 0}), x}, "Queue", "not a queue")
    -- stale: the right arena, a generation that no longer exists
    local lock = luamp.Lock()
    local p = core.sync_payload(lock)
    local stale = {arena = p.arena, carried = true, fdi = 0, off = p.off, gen = p.gen + 1000}
    check({forged("luamp.Lock", stale), luamp.Lock()}, "Lock", "shared object")
    -- an offset inside the arena where no object of that type lives
    check({forged("luamp.Event", {arena = p.arena, carried = true, fdi = 0, off = 4096 * 7, gen = p.gen}),
           luamp.Lock()}, "Event", "shared object")
    -- an arena nobody has
    check(forged("luamp.Semaphore", {arena = string.rep("ab", 16), carried = true, fdi = 0, off = 4096, gen = 1}),
          "Semaphore", "did not arrive")
    x:close(); y:close()
    -- nothing leaked: descriptors that came with the bad messages were closed
  end)

  it("frees arena objects sent to workers once every holder lets go", function()
    local pool = luamp.Pool(2)
    local function gc_everywhere()
      for _ = 1, 2 do
        local bar = luamp.Barrier(2)
        pool:map(function(b) collectgarbage(); collectgarbage(); b:wait(10) end, {bar, bar}, 1)
      end
      collectgarbage(); collectgarbage()
      return core.arena_stats().live
    end
    local function round()
      local lock, v = luamp.Lock(), luamp.Value("i", 0)
      assert.equal(1, pool:apply(function(l, x) l:acquire(); l:release(); return x:add(1) end, {lock, v}))
    end
    round()
    local before = gc_everywhere()
    for _ = 1, 100 do round() end
    -- and results: a Value made by the worker, dropped by the parent
    for _ = 1, 50 do assert.equal(5, pool:apply(function() return luamp.Value("i", 5) end).value) end
    assert.equal(before, gc_everywhere())
    pool:close(); pool:join()
  end)

  it("does not leak descriptors: create a Queue, send it to a pool worker, use it, drop it", function()
    local rounds = tonumber(os.getenv("LUAMP_HANDLE_ROUNDS") or "200")
    local pool = luamp.Pool(2)
    -- each worker reports its count while the other waits at the barrier, so both answer
    local function worker_counts()
      local bar = luamp.Barrier(2)
      local r = pool:map(function(b)
        collectgarbage(); collectgarbage()
        b:wait(10)
        return {luamp.getpid(), fd_count()}
      end, {bar, bar}, 1)
      local t = {}
      for _, x in ipairs(r) do t[x[1]] = x[2] end
      return t
    end
    local function round()
      local q = luamp.Queue()
      pool:apply(function(qq) qq:put("x") end, {q})
      assert.equal("x", q:get(true, 10))
      q:close()
    end
    for _ = 1, 5 do round() end          -- warm up: buffers, cached functions
    worker_counts()                      -- and the arena (the barrier lives there)
    collectgarbage(); collectgarbage()
    local wbefore = worker_counts()
    local before = fd_count()
    local t0 = luamp.time()
    for _ = 1, rounds do round() end
    local dt = luamp.time() - t0
    collectgarbage(); collectgarbage()
    local wafter = worker_counts()
    assert.equal(before, fd_count())
    for pid, n in pairs(wbefore) do assert.equal(n, wafter[pid], "worker " .. pid) end
    pool:close(); pool:join()
    io.stderr:write(string.format("\n[handles] %d rounds of queue-to-worker in %.2f s\n", rounds, dt))
  end)
end)
