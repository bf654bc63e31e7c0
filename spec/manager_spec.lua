-- Managers: Manager() proxies, BaseManager over TCP and Unix sockets, the authenticated
-- wire (runtime/auth.c) seen from outside, and a server that keeps serving whatever its
-- clients do.
local H = require "helper"
local luamp = H.luamp
local raises = H.raises

describe("Manager", function()
  local m
  before_each(function() m = luamp.Manager() end)
  after_each(function() m:shutdown() end)

  it("dict: index, assign, delete, methods, pairs, #, copy on read", function()
    local d = m:dict({a = 1})
    d.k = 1
    d["x"] = {1, 2}
    assert.equal(1, d.k)
    assert.same({1, 2}, d.x)
    assert.equal(3, #d)
    local t = d.x
    t[1] = 99                              -- a copy: the dict is unchanged
    assert.same({1, 2}, d.x)
    d.x = t
    assert.same({99, 2}, d.x)
    d.k = nil
    assert.is_nil(d.k)
    assert.equal(2, #d)
    assert.equal("dflt", d:get("missing", "dflt"))
    d:update({b = 2, c = 3})
    assert.same({"a", "x", "b", "c"}, (function() local k = d:keys(); return {k[1], k[2], table.unpack(k, 3)} end)())
    assert.equal(3, d:pop("c"))
    assert.equal(7, d:pop("c", 7))
    raises("Value", function() d:pop("c") end)
    local seen = {}
    for k, v in pairs(d) do seen[k] = v end
    assert.same({a = 1, x = {99, 2}, b = 2}, seen)
    assert.same({{"a", 1}, {"x", {99, 2}}, {"b", 2}}, d:items())
  end)

  it("list: index, append, extend, insert, pop, remove, ipairs, #", function()
    local l = m:list({1, 2})
    l:append(3)
    assert.equal(3, #l)
    assert.equal(1, l[1])
    l[2] = 20
    l:extend({4, 5})
    l:insert(1, 0)
    assert.same({0, 1, 20, 3, 4, 5, n = 6}, l:totable())
    assert.equal(5, l:pop())
    assert.equal(0, l:pop(1))
    l:remove(20)
    raises("Value", function() l:remove(20) end)
    assert.equal(2, l:index(3))
    assert.equal(1, l:count(4))
    l:reverse()
    local got = {}
    for i, v in ipairs(l) do got[i] = v end
    assert.same({4, 3, 1}, got)
    assert.is_nil(l[10])
  end)

  it("Namespace, Value, Array", function()
    local ns = m:Namespace()
    ns.counter = 0
    ns.counter = ns.counter + 1
    assert.equal(1, ns.counter)
    local v = m:Value("i", 5)
    v.value = v.value + 1
    assert.equal(6, v.value)
    assert.equal(6, v:get())
    local a = m:Array("i", {1, 2, 3})
    a[2] = 20
    assert.equal(3, #a)
    assert.same({1, 20, 3, n = 3}, a:totable())
    raises("Value", function() a[4] = 1 end)
  end)

  it("errors keep their kind: Empty, Full, Value; methods not exposed raise Value", function()
    local q = m:Queue(1)
    raises("Empty", function() q:get(true, 0.05) end)
    raises("Empty", function() q:get_nowait() end)
    q:put(1)
    raises("Full", function() q:put(2, false) end)
    raises("Value", function() q:no_such_method() end)
    local lock = m:Lock()
    raises("Value", function() lock:release() end)
    local e = raises("Value", function() m:Semaphore("x") end)
    assert.truthy(e.message:match("Semaphore"))
  end)

  it("sync objects: Lock, RLock, Semaphore, Event, Condition, Barrier", function()
    local lock = m:Lock()
    assert.is_true(lock:acquire())
    assert.is_false(lock:acquire(false))
    assert.is_false(lock:acquire(true, 0.02))
    lock:release()
    assert.equal(42, lock:with(function() return 42 end))
    local r = m:RLock()
    assert.is_true(r:acquire())
    assert.is_true(r:acquire())
    r:release(); r:release()
    raises("Value", function() r:release() end)
    local s = m:BoundedSemaphore(1)
    assert.is_true(s:acquire())
    s:release()
    raises("Value", function() s:release() end)
    local ev = m:Event()
    assert.is_false(ev:wait(0.01))
    ev:set()
    assert.is_true(ev:wait())
    local c = m:Condition()
    raises("Value", function() c:notify() end)
    c:acquire()
    assert.is_false(c:wait(0.01))
    c:release()
    local b = m:Barrier(1)
    assert.equal(0, b:wait())
    assert.equal(1, b.parties)
    assert.is_false(b.broken)
  end)

  it("proxies cross to child processes (args, queue items) and work there", function()
    local d, q = m:dict(), m:Queue()
    local lq = luamp.Queue()
    lq:put(d)
    local p = H.start(function(qq, lqq)
      local dd = lqq:get()
      dd.child = "yes"
      qq:put(#dd)
    end, q, lq)
    assert.equal(1, q:get())
    p:join()
    assert.equal(0, p.exitcode)
    assert.equal("yes", d.child)
  end)

  it("proxies cross into Pool tasks and into other proxies", function()
    local d, q = m:dict(), m:Queue()
    d.q = q                                    -- a proxy stored in a dict
    d.q:put("via dict")
    assert.equal("via dict", q:get())
    local pool = luamp.Pool(2)
    local r = pool:map(function(x) d[x] = x * x; return x end, {1, 2, 3})
    assert.same({1, 2, 3}, {table.unpack(r, 1, 3)})
    assert.equal(5, pool:apply(function(dd) dd.pool = "yes"; return #dd end, {d}))
    pool:close(); pool:join()
    assert.same({1, 4, 9}, {d[1], d[2], d[3]})
  end)

  it("Condition wait_for and Barrier across processes", function()
    local c, d, b = m:Condition(), m:dict(), m:Barrier(2)
    c:acquire()
    local p = H.start(function(cc, dd, bb)
      cc:acquire(); dd.ready = true; cc:notify(); cc:release()
      bb:wait()
    end, c, d, b)
    assert.is_true(c:wait_for(function() return d.ready end, 10))
    c:release()
    local idx = b:wait(10)
    assert.truthy(idx == 0 or idx == 1)
    p:join()
    assert.equal(0, p.exitcode)
  end)

  it("a blocked call parks only its caller: others are served meanwhile", function()
    local q, ev, d = m:Queue(), m:Event(), m:dict()
    local p = H.start(function(qq, dd)
      dd.started = true
      dd.got = qq:get()              -- blocks on the server
    end, q, d)
    local deadline = luamp.time() + 10
    while not d.started do assert(luamp.time() < deadline); luamp.sleep(0.001) end
    -- the server still answers this process while the child is parked
    for i = 1, 20 do d.i = i end
    assert.is_false(ev:is_set())
    q:put("item")
    p:join()
    assert.equal("item", d.got)
  end)

  it("Value + Lock counter from several processes is exact", function()
    local v, lock = m:Value("i", 0), m:Lock()
    local ps = {}
    for i = 1, 4 do
      ps[i] = H.start(function(vv, ll)
        for _ = 1, 25 do ll:with(function() vv.value = vv.value + 1 end) end
      end, v, lock)
    end
    for _, p in ipairs(ps) do p:join(); assert.equal(0, p.exitcode) end
    assert.equal(100, v.value)
  end)

  it("shutdown makes proxy calls raise EOF/BrokenPipe promptly; <close> shuts down", function()
    local d, q = m:dict(), m:Queue()
    d.a = 1
    local p = H.start(function(qq) local ok, e = pcall(qq.get, qq); os.exit(e and (e.kind == "EOF" or e.kind == "BrokenPipe") and 7 or 1) end, q)
    luamp.sleep(0.05)
    local t0 = luamp.time()
    m:shutdown()
    p:join(5)
    assert.equal(7, p.exitcode)
    local ok, e = pcall(function() return d.a end)
    assert.is_false(ok)
    assert.truthy(e.kind == "EOF" or e.kind == "BrokenPipe", tostring(e))
    assert.truthy(luamp.time() - t0 < 2)
    local path
    do
      local m2 <close> = luamp.Manager()
      path = m2.address
      m2:dict().x = 1
    end
    assert.is_nil(io.open(path, "r"))       -- the Unix socket is removed at shutdown
  end)

  it("the default authkey is per process tree: 32 random bytes, inherited", function()
    local k = luamp.current_process().authkey
    assert.equal(32, #k)
    local q = luamp.Queue()
    local p = H.start(function(qq) qq:put(luamp.current_process().authkey) end, q)
    assert.equal(k, q:get())
    p:join()
  end)
end)

describe("BaseManager", function()
  it("register, start on TCP port 0, connect from another manager object", function()
    local QM = luamp.BaseManager{address = {"127.0.0.1", 0}, authkey = "abc"}
    local store = {}
    QM:register("get_store", function() return store end)
    QM:register("get_counter", {callable = function()
      local c = {n = 0}
      function c:incr(k) self.n = self.n + (k or 1); return self.n end
      function c:secret() return "no" end
      return c
    end, exposed = {"incr"}})
    QM:start()
    local port = QM.address[2]
    assert.truthy(port > 0)
    local C = luamp.BaseManager{address = {"127.0.0.1", port}, authkey = "abc"}
    C:register("get_store")
    C:register("get_counter")
    C:connect()
    local s = C:get_store()
    s.x = 5
    s.y = 6
    assert.equal(5, s.x)
    assert.equal(2, #C:get_store():keys())
    local seen = {}
    for k, v in pairs(s) do seen[k] = v end
    assert.same({x = 5, y = 6}, seen)
    assert.equal("d", s:get("z", "d"))
    local c = C:get_counter()
    assert.equal(1, c:incr())
    assert.equal(3, c:incr(2))
    raises("Value", function() c:secret() end)
    QM:shutdown()
  end)

  it("a Unix socket path address: served, connected to, removed at shutdown", function()
    local path = os.tmpname()
    os.remove(path)
    local QM = luamp.BaseManager{address = path, authkey = "p"}
    QM:register("get", function() return {v = 42} end)
    QM:start()
    assert.equal(path, QM.address)
    assert.truthy(io.open(path, "r") == nil and H.sh("test -S " .. H.q(path) .. " && echo sock") == "sock\n")
    local C = luamp.BaseManager{address = path, authkey = "p"}
    C:register("get")
    C:connect()
    assert.equal(42, C:get().v)
    QM:shutdown()
    assert.equal("", H.sh("test -e " .. H.q(path) .. " && echo exists"))
  end)

  it("get_server():serve_forever() in a child; srv.address before serving", function()
    local QM = luamp.BaseManager{address = {"127.0.0.1", 0}, authkey = "k"}
    local q = luamp.Queue()
    QM:register("get_q", function() return q end)
    local srv = QM:get_server()
    local port = srv.address[2]
    local p = H.start(function() srv:serve_forever() end)
    local C = luamp.BaseManager{address = {"127.0.0.1", port}, authkey = "k"}
    C:register("get_q")
    C:connect()
    local rq = C:get_q()
    rq:put(3)
    assert.equal(3, rq:get())
    raises("Empty", function() rq:get(true, 0.05) end)    -- a luamp Queue served: parks, then Empty
    p:terminate()
    p:join()
  end)

  it("a wrong authkey raises Auth; the server keeps serving the others", function()
    local QM = luamp.BaseManager{address = {"127.0.0.1", 0}, authkey = "right"}
    QM:register("get", function() return {v = 1} end)
    QM:start()
    local port = QM.address[2]
    local bad = luamp.BaseManager{address = {"127.0.0.1", port}, authkey = "wrong"}
    raises("Auth", function() bad:connect() end)
    local good = luamp.BaseManager{address = {"127.0.0.1", port}, authkey = "right"}
    good:register("get")
    good:connect()
    assert.equal(1, good:get().v)
    QM:shutdown()
  end)

  it("the server side of a wrong key fails with Auth too", function()
    local l = luamp._core.auth_listen("127.0.0.1", 0)
    local _, port = l:address()
    local p = H.start(function()
      local ch = luamp._core.auth_connect("127.0.0.1", port, 5)
      pcall(ch.handshake, ch, "wrong", 5)
    end)
    local ch
    while not ch do luamp._core.auth_poll({l}, 5); ch = l:accept() end
    ch:start("right")
    local err
    for _ = 1, 100 do
      local ok, e = pcall(ch.step, ch)
      if not ok then err = e break end
      if e then break end
      luamp._core.auth_poll({ch}, 5)
    end
    assert.equal("Auth", err and err.kind)
    p:join()
    l:close()
  end)

  it("a manager that closes during the handshake (shutting down) is EOF, not Auth", function()
    -- a stand-in server: says hello, reads the client's proof, then closes without a
    -- verdict, as a manager stopping at that moment does (a refusal says so first)
    local path = os.tmpname()
    os.remove(path)
    local py = [[
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
c.sendall((41).to_bytes(4, "big") + b"LUAMPM3\0" + os.urandom(32) + b"\x01")
got = b""
while len(got) < 4 + 65:
    b = c.recv(4 + 65 - len(got))
    if not b: break
    got += b
c.close()
]]
    local server = luamp.subprocess.Popen({"python3", "-c", py, path}, {stdout = "pipe"})
    finally(function() server:kill(); server:wait(); os.remove(path) end)
    assert.equal("ready", server.stdout:read("l"))
    local c = luamp.BaseManager{address = path, authkey = "k"}
    local e = raises("EOF", function() c:connect() end)
    assert.truthy(tostring(e):find("during the handshake", 1, true), tostring(e))
  end)

  describe("survives hostile and broken clients", function()
    local QM, port, lq
    before_each(function()
      lq = luamp.Queue()
      QM = luamp.BaseManager{address = {"127.0.0.1", 0}, authkey = "key"}
      QM:register("get", function() return {v = 1} end)
      QM:register("get_q", function() return lq end)
      QM:start()
      port = QM.address[2]
    end)
    after_each(function() QM:shutdown() end)

    local function served()
      local g = luamp.BaseManager{address = {"127.0.0.1", port}, authkey = "key"}
      g:register("get")
      g:connect()
      return g:get().v == 1
    end

    it("a half handshake then silence does not block others", function()
      -- connected, the server's hello unanswered
      local idle = luamp._core.auth_connect("127.0.0.1", port, 5)
      assert.is_true(served())
      idle:close()
    end)

    it("garbage and a 4 GiB length prefix are refused; others still served", function()
      for _, junk in ipairs({"GET / HTTP/1.0\r\n\r\n", "\255\255\255\255xxxx", string.rep("\0", 100)}) do
        local f = os.tmpname()
        local fh = assert(io.open(f, "wb")); fh:write(junk); fh:close()
        local out = H.sh("bash -c " .. H.q("cat " .. f .. " > /dev/tcp/127.0.0.1/" .. port) .. " && echo done")
        os.remove(f)
        assert.equal("done\n", out)
        assert.is_true(served())
      end
    end)

    it("a client killed in the middle of a call leaves the server serving", function()
      local p = H.start(function()
        local c = luamp.BaseManager{address = {"127.0.0.1", port}, authkey = "key"}
        c:register("get_q")
        c:connect()
        c:get_q():get()                        -- blocks forever
      end)
      H.until_waiting(lq, "get", 1)            -- the server parked the call
      p:kill()
      p:join()
      assert.is_true(served())
    end)
  end)
end)

describe("Manager and Ctrl-C", function()
  it("Ctrl-C during a blocked proxy call raises Interrupted; the server (same process group) survives", function()
    local script = H.script([[
      local m = luamp.Manager()
      local q = m:Queue()
      q:put("warm")
      q:get()
      io.stdout:write("ready\n")
      io.stdout:flush()
      local ok, e = pcall(q.get, q)               -- blocks until the SIGINT
      print(ok, type(e) == "table" and e.kind or tostring(e))
      q:put(1)
      print(q:get())                              -- a new connection, the same server
      m:shutdown()
    ]])
    local out_file = os.tmpname()
    -- the host leads its own process group; the signal goes to the whole group, as a
    -- terminal's Ctrl-C does, so the manager's server process gets it too
    -- (the host runs in the foreground: a background job would start with SIGINT ignored)
    local inner = "( for i in $(seq 1000); do grep -q ready " .. out_file .. " && break; sleep 0.01; done; "
      .. "kill -INT -$$ ) & exec setsid " .. H.q(H.host) .. " " .. H.q(script) .. " > " .. out_file .. " 2>&1"
    local cmd = "sh -c " .. H.q(inner) .. "; echo rc=$?"
    local rc = H.sh(cmd)
    local f = assert(io.open(out_file)); local out = f:read("a"); f:close()
    os.remove(out_file); os.remove(script)
    assert.equal("rc=0\n", rc, out)
    assert.equal("ready\nfalse\tInterrupted\n1\n", out)
  end)

  it("Ctrl-C while a handler runs in serve_forever raises Interrupted out of it (not sent as a reply)", function()
    local script = H.script([[
      local m = luamp.BaseManager{address = {"127.0.0.1", 0}, authkey = "k"}
      m:register("nap", function()
        -- Ctrl-C, in the handler (the wait or the sleep raises Interrupted)
        luamp.subprocess.Popen({"kill", "-INT", tostring(luamp.current_process().pid)}):wait()
        luamp.sleep(10)
        return "slept"
      end)
      local srv = m:get_server()
      print(srv.address[2])
      io.stdout:flush()
      local ok, e = pcall(srv.serve_forever, srv)
      print(ok, type(e) == "table" and e.kind or tostring(e))
    ]])
    local p = luamp.subprocess.Popen({H.host, script}, {stdout = "pipe"})
    finally(function() if p:poll() == nil then p:kill(); p:wait() end; os.remove(script) end)
    local port = assert(tonumber(p.stdout:read("l")))
    local c = luamp.BaseManager{address = {"127.0.0.1", port}, authkey = "k"}
    c:register("nap")
    c:connect()
    local ok, e = pcall(c.nap, c)
    -- the server stopped: the call sees its connection close, not an error reply
    assert.is_false(ok)
    assert.equal("EOF", type(e) == "table" and e.kind or tostring(e))
    local out = p:communicate(nil, 5)
    assert.equal("false\tInterrupted\n", out)
  end)
end)

-- Proxy calls whose arguments and results are all nil, booleans, numbers and strings go
-- as vectors of plain values (runtime/auth.c, "Plain calls"), anything else as a codec
-- table. Both must carry every value exactly.
describe("Manager plain calls", function()
  local QM, obj
  before_each(function()
    QM = luamp.BaseManager{address = {"127.0.0.1", 0}, authkey = "plain"}
    QM:register("echo", function()
      local e = {}
      function e.back(_, ...) return select("#", ...), ... end
      function e.same(_, a, b) return rawequal(a, b) end
      function e.fail(_, v) error({v}) end
      return setmetatable({}, {__index = e})
    end)
    QM:start()
    obj = QM:echo()
  end)
  after_each(function() QM:shutdown() end)

  it("carry every plain value exactly, with its integer or float subtype", function()
    local big = string.rep("\0ab\255", 300000)
    local vals = table.pack(nil, true, false, 0, -1, math.mininteger, math.maxinteger, 0.5,
      -0.0, 1 / 0, -1 / 0, 1e308, 2^53, "", "x\0y", big, nil)
    local got = table.pack(obj:back(table.unpack(vals, 1, vals.n)))
    assert.equal(vals.n, got[1])
    assert.equal(vals.n + 1, got.n)
    for i = 1, vals.n do
      local a, b = vals[i], got[i + 1]
      assert.equal(math.type(a), math.type(b), "value " .. i)
      assert.is_true(rawequal(a, b), "value " .. i)
    end
    assert.equal(-1 / 0, 1 / got[10])              -- -0.0 stays negative
    local nan = select(2, obj:back(0 / 0))
    assert.is_true(nan ~= nan)
    assert.equal(0, (obj:back()))
  end)

  it("many values, tables among them and errors go through the codec as before", function()
    local many = {}
    for i = 1, 400 do many[i] = i end
    local got = table.pack(obj:back(table.unpack(many)))
    assert.equal(400, got[1])
    assert.equal(400, got[401])
    local t = {1, {2}}
    assert.is_true(obj:same(t, t))             -- one table in one call stays one table
    assert.same({1, {2}}, select(2, obj:back(t)))
    local ok, e = pcall(obj.fail, obj, "why")
    assert.is_false(ok)
    assert.equal("Remote", e.kind)
  end)

  it("requests pipelined behind a parked one wait their turn and are answered in order", function()
    local M = luamp.Manager{address = {"127.0.0.1", 0}}
    local q, d = M:Queue(), M:dict()
    d.k = 7
    local function id_of(p)
      local _, h = getmetatable(p).__luamp_handle(p)
      return h.id
    end
    local core = luamp._core
    local ch = core.auth_connect("127.0.0.1", M.address[2], 5)
    ch:handshake(luamp.current_process().authkey, 5)
    -- a client of its own sends without waiting: send_reply seals {true, n, values...} as
    -- the plain vector of the values, which is what a proxy's plain request is
    ch:send_reply({true, 4, id_of(q), "get", true, 5})      -- parks: the queue is empty
    ch:send_reply({true, 3, id_of(d), "__getitem", "k"})    -- plain, behind it
    ch:send({id_of(d), "__setitem", 2, "t", {1}})           -- a request table, behind both
    q:put("x")
    -- each ping takes the oldest reply not yet read
    assert.same({n = 2, true, "x"}, table.pack(ch:request(0, "ping")))
    assert.same({n = 2, true, 7}, table.pack(ch:request(0, "ping")))
    assert.same({n = 1, true}, table.pack(ch:request(0, "ping")))
    assert.same({n = 2, true, "pong"}, table.pack(ch:request(0, "ping")))
    assert.same({n = 2, true, "pong"}, table.pack(ch:request(0, "ping")))
    assert.same({1}, d.t)
    ch:close()
    M:shutdown()
  end)
end)
