-- Manager objects are freed when the process that made them lets go of its last proxy
-- (lua/luamp/manager.lua, "Freeing"), and never while another process may still use
-- them: a proxy that crossed to another process (Queue, spawn args, another manager
-- object) or was inherited over fork keeps its object alive.
local H = require "helper"
local luamp = H.luamp
local core = luamp._core

-- the object id of a proxy, read from its tostring (its handle hook would pin it)
local function id_of(p)
  return tonumber(tostring(p):match(" id=(%d+) "))
end

local function collect()
  collectgarbage()
  collectgarbage()
end

-- Asks the manager for its object count until it is `want` (a killed client's end is
-- seen by the server's loop in its own time), for at most 10 s; returns the last count.
local function count_becomes(m, want)
  local deadline = luamp.time() + 10
  local n = m:_object_count()
  while n ~= want and luamp.time() < deadline do
    luamp.sleep(0.005)
    n = m:_object_count()
  end
  return n
end

describe("Manager object freeing", function()
  local m, probe
  -- a call to the manager: carries the releases this process has queued
  local function flush() return probe.x end
  before_each(function()
    m = luamp.Manager()
    probe = m:dict()
  end)
  after_each(function() m:shutdown() end)

  it("a loop making dicts keeps the server's object count bounded", function()
    collect()
    local n0 = m:_object_count()
    local most = 0
    for i = 1, 3000 do
      local d = m:dict()
      d.x = i
      if i % 100 == 0 then
        collect()
        local n = m:_object_count()
        if n > most then most = n end
      end
    end
    -- each collection queues at most the last 100 dicts; every call carries 200 releases
    assert.is_true(most <= n0 + 300, "the server held " .. most .. " objects")
    collect()
    local n
    for _ = 1, 30 do n = m:_object_count() end
    assert.equal(n0, n)
    -- and what is still referenced lives on
    local keep = m:dict({v = 1})
    collect()
    for _ = 1, 3 do m:_object_count() end
    assert.equal(1, keep.v)
  end)

  it("a proxy inherited over fork works in the child after the parent collected it", function()
    local go, out = luamp.Event(), luamp.Queue()
    local box = {m:dict({v = "fork"})}
    local p = H.start(function(b)
      go:wait()
      local d = b[1]
      d.seen = "child"
      out:put(d.v)
    end, box)
    box[1] = nil
    collect()
    flush()                                  -- carries any release there is
    go:set()
    assert.equal("fork", out:get(true, 30))
    p:join()
    assert.equal(0, p.exitcode)
  end)

  it("a proxy inherited over fork outlives the process that made it (killed -9)", function()
    local ready, out, go = luamp.Queue(), luamp.Queue(), luamp.Event()
    local a = H.start(function()
      local box = {m:dict({v = "from A"})}
      local b = luamp.Process{target = function(bx)
        local mine = m:dict()                -- a session of its own, and the inherited one
        mine.x = 1                           -- dropped from view: nothing may close it
        mine = nil                           -- luacheck: ignore
        collect()
        go:wait()
        local ok, v = pcall(function() return bx[1].v end)
        out:put(ok and v or tostring(v))
      end, args = {box}}
      b:start()
      box[1] = nil
      collect()
      flush()
      ready:put(b.pid)
      luamp.Event():wait()                   -- until killed
    end)
    local bpid = ready:get(true, 30)
    H.kill9(a)
    flush()                                  -- the server has seen A's end by the second call
    flush()
    go:set()
    assert.equal("from A", out:get(true, 30))
    -- b is A's child, not ours: wait for it to go by its pid
    local deadline = luamp.time() + 30
    while os.execute("kill -0 " .. bpid .. " 2>/dev/null") and luamp.time() < deadline do
      luamp.sleep(0.01)
    end
  end)

  it("a proxy in a spawn child's args works there after the parent collected it", function()
    local ctx = luamp.get_context("spawn")
    local go, out = ctx.Event(), ctx.Queue()
    local box = {m:dict({v = "spawn"})}
    local p = ctx.Process{target = function(b, g, o)
      g:wait()
      o:put(b[1].v)
    end, args = {box, go, out}}
    p:start()
    box[1] = nil
    collect()
    flush()
    go:set()
    assert.equal("spawn", out:get(true, 30))
    p:join()
    assert.equal(0, p.exitcode)
  end)

  it("a proxy put on a Queue is served to its taker after the sender dropped it", function()
    local lq, out = luamp.Queue(), luamp.Queue()
    do
      local d = m:dict({v = 42})
      lq:put(d)
    end
    collect()
    flush()
    local p = H.start(function()
      local d = lq:get()
      out:put(d.v)
    end)
    assert.equal(42, out:get(true, 30))
    p:join()
    assert.equal(0, p.exitcode)
  end)

  it("a proxy put on a Queue by a process that then exited still works", function()
    local lq = luamp.Queue()
    local p = H.start(function()
      local d = m:dict({v = 7})
      lq:put(d)
      d = nil                                -- luacheck: ignore
      collect()
      flush()
      local made = m:dict({v = "mine"})      -- never shared: freed when this process ends
      assert(made.v == "mine")
    end)
    p:join()
    assert.equal(0, p.exitcode)
    local d = lq:get(true, 30)
    assert.equal(7, d.v)
    d.v = 8
    assert.equal(8, d.v)
  end)

  it("a proxy sent from inside a task (its pin waits in the task) keeps its object", function()
    local lq, out = luamp.Queue(), luamp.Queue()
    local t = luamp.task(function()
      local d = m:dict({v = "task"})
      lq:put(d)
      local d2 = m:dict()
      d2.inner = m:dict({w = 3})
      return d2.inner.w
    end)
    assert.equal(3, t:wait(30))
    t = nil                                  -- luacheck: ignore
    collect()
    flush()
    local p = H.start(function() out:put(lq:get().v) end)
    assert.equal("task", out:get(true, 30))
    p:join()
  end)

  it("a proxy stored in another manager object keeps its object", function()
    local holder = m:dict()
    local other = luamp.Manager()
    finally(function() other:shutdown() end)
    do
      local q = m:Queue()
      holder.q = q                           -- the same manager
      local od = other:dict()
      od.inner = m:list({1, 2})              -- a proxy of m inside another manager's dict
      holder.od = od
    end
    collect()
    for _ = 1, 3 do flush() end
    holder.q:put("kept")
    assert.equal("kept", holder.q:get())
    local od = holder.od
    assert.same({n = 2, 1, 2}, od.inner:totable())
  end)

  it("a process killed -9 holding only its own objects: they are freed", function()
    collect()
    local n0 = m:_object_count()
    local ready = luamp.Queue()
    local p = H.start(function()
      local keep = {}
      for i = 1, 50 do keep[i] = m:dict({i = i}) end
      ready:put(#keep)
      luamp.Event():wait()                   -- until killed
    end)
    assert.equal(50, ready:get(true, 30))
    assert.equal(n0 + 50, m:_object_count())
    H.kill9(p)
    assert.equal(n0, count_becomes(m, n0))
  end)

  it("a process that exits frees what it made, but not what it handed on", function()
    collect()
    local n0 = m:_object_count()
    local lq = luamp.Queue()
    local p = H.start(function()
      local keep = {}
      for i = 1, 10 do keep[i] = m:dict({i = i}) end
      lq:put(keep[3])
    end)
    p:join()
    assert.equal(0, p.exitcode)
    assert.equal(n0 + 1, count_becomes(m, n0 + 1))
    local d = lq:get(true, 30)
    assert.equal(3, d.i)
  end)

  -- what a client of its own sends as releases: of another session's id, with no session,
  -- malformed; the replies are the next test's business (this one holds before sessions)
  local function forge(ch, id, token)
    ch:request(0, "_rel", token, 1, id, 0, "ping")
    ch:request(0, "_rel", "nope", 2, id, -1, 0, "ping")
    ch:request(0, "_rel", 5, 1, id, 0, "ping")
    ch:request(0, "_rel", token, 3, "x", 1.5, 1e9, 0, "ping")
    ch:request(0, "_rel", token, 1e6, id, 0, "ping")
    ch:request(0, "_rel", token, -1, id, 0, "ping")
    ch:request(0, "_rel", token, 0, 0, "_rel", token, 1, id, 0, "ping")
    local many = {0, "_rel", token, 1000}
    for i = 1, 1000 do many[4 + i] = id end
    many[1005], many[1006] = 0, "ping"
    ch:request(table.unpack(many, 1, 1006))
  end

  local function raw_channel()
    local ch = core.auth_connect(m.address, nil, 5)
    ch:handshake(luamp.current_process().authkey, 5)
    return ch
  end

  it("forged releases from another client leave the object working", function()
    local d = m:dict({v = "safe"})
    local ch = raw_channel()
    local got, token = ch:request(0, "_session")
    if got ~= true then token = "no sessions" end
    forge(ch, id_of(d), token)
    ch:close()
    local p = H.start(function()              -- and from another process
      local c = raw_channel()
      local ok, t = c:request(0, "_session")
      forge(c, id_of(d), ok == true and t or "none")
    end)
    p:join()
    collect()
    flush()
    assert.equal("safe", d.v)
    d.v = "still"
    assert.equal("still", d.v)
  end)

  it("a release is honoured only from the owning session; malformed ones are refused", function()
    local d = m:dict({v = "safe"})
    local id = id_of(d)
    local n = m:_object_count()
    local ch = raw_channel()
    local ok, token = ch:request(0, "_session")
    assert.is_true(ok)
    assert.equal("string", type(token))
    local pong = {n = 2, true, "pong"}
    assert.same(pong, table.pack(ch:request(0, "_rel", token, 1, id, 0, "ping")))
    assert.same(pong, table.pack(ch:request(0, "_rel", "nope", 2, id, -1, 0, "ping")))
    assert.same(pong, table.pack(ch:request(0, "_rel", 5, 1, id, 0, "ping")))
    assert.same(pong, table.pack(ch:request(0, "_rel", token, 3, "x", 1.5, 1e9, 0, "ping")))
    local r = ch:request(0, "_rel", token, 1e6, id, 0, "ping")
    assert.equal("Value", r[1] == false and r[2].kind)
    r = ch:request(0, "_rel", token, -1, id, 0, "ping")
    assert.equal("Value", r[1] == false and r[2].kind)
    r = ch:request(0, "_rel", token, 0, 0, "_rel", token, 1, id, 0, "ping")
    assert.equal("Value", r[1] == false and r[2].kind)
    local many = {0, "_rel", token, 1000}
    for i = 1, 1000 do many[4 + i] = id end
    many[1005], many[1006] = 0, "ping"
    assert.same(pong, table.pack(ch:request(table.unpack(many, 1, 1006))))
    -- its own objects it may release
    local _, mine = ch:request(0, "create", token, "dict")
    assert.equal(n + 1, m:_object_count())
    assert.same(pong, table.pack(ch:request(0, "_rel", token, 1, mine, 0, "ping")))
    assert.equal(n, m:_object_count())
    ch:close()
    assert.equal("safe", d.v)
  end)
end)

describe("Manager object freeing across managers", function()
  it("a proxy of a manager that is gone releases nothing at a new one on the same port", function()
    local a = luamp.Manager{address = {"127.0.0.1", 0}, authkey = "port"}
    local port = a.address[2]
    local old = a:dict()                     -- id 1 at a
    a:shutdown()
    -- the new server runs in a spawn child: a fork here would pin `old` (made before it)
    local ctx = luamp.get_context("spawn")
    local ready = ctx.Queue()
    local srv = ctx.Process{target = function(p, r)
      local B = luamp.BaseManager{address = {"127.0.0.1", p}, authkey = "port"}
      B:register("get_d", function() return {v = "b's"} end)
      local server = B:get_server()
      r:put(true)
      server:serve_forever()
    end, args = {port, ready}}
    srv:start()
    finally(function() srv:terminate(); srv:join() end)
    assert.is_true(ready:get(true, 30))
    local b = luamp.BaseManager{address = {"127.0.0.1", port}, authkey = "port"}
    b:register("get_d")
    b:connect()
    local new = b:get_d()                    -- id 1 at b
    assert.equal(id_of(old), id_of(new))
    old = nil                                -- luacheck: ignore
    collect()
    new.w = 1                                -- would carry a release of "id 1"
    assert.equal("b's", new.v)
  end)
end)

describe("BaseManager object freeing", function()
  local QM, shared
  before_each(function()
    QM = luamp.BaseManager{address = {"127.0.0.1", 0}, authkey = "refs"}
    shared = {}
    QM:register("get_box", function() return shared end)
    QM:start()
  end)
  after_each(function() QM:shutdown() end)

  it("a registered typeid returning the same object twice: it works while either proxy lives", function()
    local a = QM:get_box()
    local b = QM:get_box()
    a.x = 1
    assert.equal(1, b.x)
    a = nil                                  -- luacheck: ignore
    collect()
    b.y = 2                                  -- carries a's release
    assert.equal(1, b.x)
    b = nil                                  -- luacheck: ignore
    collect()
    local c = QM:get_box()                   -- the object itself lives on the server
    assert.same({x = 1, y = 2}, c:totable())
  end)

  it("a registered typeid returning the same object twice: each id is freed alone", function()
    collect()
    local n0 = QM:_object_count()
    local a, b = QM:get_box(), QM:get_box()
    assert.equal(n0 + 2, QM:_object_count())
    a = nil                                  -- luacheck: ignore
    collect()
    assert.equal(n0 + 1, QM:_object_count())
    b.x = 1
    b = nil                                  -- luacheck: ignore
    collect()
    assert.equal(n0, QM:_object_count())
    assert.equal(1, QM:get_box().x)
  end)
end)
