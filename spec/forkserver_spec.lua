-- The forkserver start method (runtime/forkserver.c): a clean server, spawned on first
-- use, forks each child; the caller watches it through a pidfd the server hands over and
-- learns its exit code from the server. Also the Pools of both fresh-interpreter methods
-- (spawn, forkserver): per-task timeouts and maxtasksperchild.
local H = require "spec.helper"
local luamp = H.luamp

local function host(src)
  local path = H.script(src)
  local out, err, code = H.run({path})
  os.remove(path)
  return out, err, code, path
end

-- the parent pid of a process, from /proc (nil once it is gone)
local function ppid_of(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  if s:match("^%d+ %b() Z") then return nil end    -- a zombie is gone for us
  return tonumber(s:match("^%d+ %b() %a (%d+)"))
end

local function cmdline_of(pid)
  local f = io.open("/proc/" .. pid .. "/cmdline")
  if not f then return "" end
  local s = f:read("a"):gsub("%z", " ")
  f:close()
  return s
end

-- waits (up to 10 s) until pid is gone; true if it went
local function gone(pid)
  local t0 = luamp.time()
  while luamp.time() - t0 < 10 do
    if not ppid_of(pid) then return true end
    luamp.sleep(0.01)
  end
  return false
end

describe("forkserver", function()
  local ctx = luamp.get_context("forkserver")
  -- targets use no globals: busted runs a spec file in an environment of its own
  local os_exit, os_execute = os.exit, os.execute

  it("is a start method like the others, with every constructor in its context", function()
    assert.equal("forkserver", ctx.get_start_method())
    for _, name in ipairs{"Process", "Pool", "Queue", "SimpleQueue", "JoinableQueue", "Pipe",
                          "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Event",
                          "Condition", "Barrier", "Value", "Array", "Manager"} do
      assert.equal("function", type(ctx[name]), name)
    end
    local out, err, code = host [[
      luamp.set_start_method("forkserver")
      print(luamp.get_start_method())
      local q = luamp.Queue()
      local p = luamp.Process{target = function(q) q:put("via set_start_method") end, args = {q}}
      p:start(); print(q:get(true, 30)); p:join(); print(p.exitcode)
    ]]
    assert.equal(0, code, err)
    assert.equal("forkserver\nvia set_start_method\n0\n", out)
  end)

  it("forks from a clean server: the target's upvalues, not the caller's globals or script", function()
    local out, err, code = host [[
      print("script")
      PARENT_GLOBAL = "parent"
      package.loaded.parent_module = {}
      local up = {n = 41}
      local ctx = luamp.get_context("forkserver")
      local p = ctx.Process{target = function(k)
        print(PARENT_GLOBAL, package.loaded.parent_module, up.n + k, luamp.current_process().name,
          luamp.parent_process().name, luamp.parent_process().pid == PARENT_PID)
      end, args = {1}, name = "kid"}
      PARENT_PID = luamp.getpid()
      p:start(); p:join()
      print("exit", p.exitcode)
    ]]
    assert.equal(0, code, err)
    assert.equal("script\nnil\tnil\t42\tkid\tMainProcess\tfalse\nexit\t0\n", out)
  end)

  it("gives the child the caller as parent_process, alive while it is", function()
    local q = ctx.Queue()
    local p = ctx.Process{target = function(q2)
      local pp = luamp.parent_process()
      q2:put({pp.pid, pp.name, pp:is_alive(), luamp.getppid() ~= pp.pid})
    end, args = {q}}
    p:start()
    assert.same({luamp.getpid(), "MainProcess", true, true}, q:get(true, 30))
    p:join()
    assert.equal(0, p.exitcode)
  end)

  it("starts children of one server, which is not the caller", function()
    local procs = {}
    for i = 1, 2 do
      local p = ctx.Process{target = function() luamp.sleep(30) end}
      p:start()
      procs[i] = p
    end
    local s1, s2 = ppid_of(procs[1].pid), ppid_of(procs[2].pid)
    assert.equal(s1, s2)
    assert.are_not.equal(luamp.getpid(), s1)
    assert.truthy(cmdline_of(s1):find("--luamp-forkserver", 1, true), cmdline_of(s1))
    for _, p in ipairs(procs) do p:kill(); p:join() end
  end)

  it("gives exitcode, join, is_alive, sentinel, terminate, kill and close as with fork", function()
    local p = ctx.Process{target = function() os_exit(7) end}
    assert.is_nil(p.exitcode)
    assert.is_false(p:is_alive())
    H.raises("Value", function() return p.sentinel end)
    p:start()
    p:join()
    assert.equal(7, p.exitcode)
    assert.is_false(p:is_alive())
    p:close()
    H.raises("Value", p.join, p)

    local q = ctx.Process{target = function() luamp.sleep(30) end}
    q:start()
    assert.is_true(q:is_alive())
    assert.is_nil(q.exitcode)
    assert.same({}, luamp.wait({q.sentinel}, 0))
    local t0 = luamp.time()
    q:join(0.1)                              -- a timeout that passes
    assert.is_true(luamp.time() - t0 >= 0.09)
    assert.is_nil(q.exitcode)
    H.raises("Value", q.close, q)            -- running
    q:terminate()
    assert.same({q.sentinel}, luamp.wait({q.sentinel}, 10))
    -- the sentinel is ready: the exit code is known at once, as after a fork
    assert.equal(-15, q.exitcode)
    assert.is_false(q:is_alive())
    q:join()
    assert.equal(-15, q.exitcode)

    local k = ctx.Process{target = function() luamp.sleep(30) end}
    k:start(); k:kill(); k:join()
    assert.equal(-9, k.exitcode)
    k:terminate()                            -- ended: a no-op, as with fork

    local r = ctx.Process{run = function(self) os_exit(self.code) end, code = 5}
    r:start(); r:join()
    assert.equal(5, r.exitcode)
  end)

  it("passes luamp objects in args with their descriptors (Queue, Lock, Value, Pipe)", function()
    local q, lock, v = ctx.Queue(), ctx.Lock(), ctx.Value("i", 0)
    local a, b = ctx.Pipe()
    local p = ctx.Process{target = function(q2, l2, v2, b2)
      l2:acquire(); v2:add(5); l2:release()
      q2:put({"from forkserver", b2:recv()})
      b2:send("bye")
    end, args = {q, lock, v, b}}
    p:start()
    a:send(42)
    assert.same({"from forkserver", 42}, q:get(true, 30))
    assert.equal("bye", a:recv())
    p:join()
    assert.equal(0, p.exitcode)
    assert.equal(5, v.value)
    a:close(); b:close()
  end)

  it("prints a child's error with the process name and the parent's file and line", function()
    local _, err, code, path = host [[
      local p = luamp.get_context("forkserver").Process{name = "bad", target = function()
        error("boom")
      end}
      p:start(); p:join()
      os.exit(p.exitcode == 1 and 0 or 3)
    ]]
    assert.equal(0, code, err)
    assert.truthy(err:find("Process bad:\n", 1, true), err)
    assert.truthy(err:find(path .. ":2: boom", 1, true), err)
    assert.truthy(err:find("stack traceback", 1, true), err)
  end)

  it("raises at start() when the executable is missing, and starts nothing", function()
    local out, err, code = host [[
      luamp.set_executable("/nonexistent/luamp")
      local p = luamp.get_context("forkserver").Process{target = print}
      local ok, e = pcall(p.start, p)
      print(ok, e.kind, e.message)
      print(#luamp.active_children())
    ]]
    assert.equal(0, code, err)
    assert.truthy(out:find("^false\tValue\tcannot start a process: /nonexistent/luamp %(forkserver%)"), out)
    assert.truthy(out:find("No such file", 1, true), out)
    assert.truthy(out:find("\n0\n$"), out)
  end)

  it("exits with its creator: at the end of the script, and when the creator is killed", function()
    for _, how in ipairs{"end", "kill"} do
      local out, err, code = host(([[
        local ctx = luamp.get_context("forkserver")
        local p = ctx.Process{target = function() end}
        p:start(); p:join()
        local d = ctx.Process{daemon = true, target = function() luamp.sleep(30) end}
        d:start()
        local f = io.open("/proc/" .. d.pid .. "/stat"); local s = f:read("a"); f:close()
        print(s:match("^%%d+ %%b() %%a (%%d+)"), d.pid)
        io.stdout:flush()
        if %q == "kill" then os.execute("kill -9 " .. luamp.getpid()) end
      ]]):format(how))
      if how == "kill" then
        assert.truthy(code == -9 or code == 137, err)
      else
        assert.equal(0, code, err)
      end
      local server, daemon = out:match("^(%d+)\t(%d+)\n$")
      assert.truthy(server, out)
      assert.is_true(gone(tonumber(server)), how .. ": the server outlived its creator")
      assert.is_true(gone(tonumber(daemon)), how .. ": the daemon outlived its creator")
    end
  end)

  it("lets a non-daemon child outlive a killed creator, as with fork", function()
    local path = H.script [[
      local p = luamp.get_context("forkserver").Process{target = function() luamp.sleep(60) end}
      p:start()
      local f = io.open("/proc/" .. p.pid .. "/stat"); local s = f:read("a"); f:close()
      print(s:match("^%d+ %b() %a (%d+)"), p.pid)
      io.stdout:flush()
      os.execute("kill -9 " .. luamp.getpid())
    ]]
    -- output to a file: the child that lives on holds it (a pipe would not reach EOF)
    local outf = os.tmpname()
    local _, code = H.sh(H.q(H.host) .. " " .. H.q(path) .. " > " .. outf .. " 2>&1 < /dev/null")
    local f = assert(io.open(outf)); local out = f:read("a"); f:close()
    os.remove(outf); os.remove(path)
    assert.truthy(code == 137 or code == -9, tostring(code) .. ": " .. out)
    local server, pid = out:match("^(%d+)\t(%d+)\n")
    assert.truthy(server, out)
    assert.is_true(gone(tonumber(server)), "the server outlived its creator")
    assert.truthy(ppid_of(pid), "the child died with its server")
    assert(os.execute("kill -9 " .. pid))
    assert.is_true(gone(pid))
  end)

  it("starts a new server when its server was killed", function()
    local p = ctx.Process{target = function() end}
    p:start(); p:join()
    -- find our server: a child of this process running --luamp-forkserver
    local q = ctx.Process{target = function() luamp.sleep(30) end}
    q:start()
    local server = ppid_of(q.pid)
    q:kill(); q:join()
    assert.equal(-9, q.exitcode)
    assert.truthy(cmdline_of(server):find("--luamp-forkserver", 1, true))
    assert(os.execute("kill -9 " .. server))
    -- dead (a zombie of this process) before the next start, which is then sure to find
    -- the control socket broken
    local t0 = luamp.time()
    while ppid_of(server) and luamp.time() - t0 < 10 do luamp.sleep(0.005) end
    -- the next start finds the control socket broken and starts another server
    local r = ctx.Process{target = function() os_exit(4) end}
    r:start(); r:join()
    assert.equal(4, r.exitcode)
    local s = ctx.Process{target = function() luamp.sleep(30) end}
    s:start()
    assert.are_not.equal(server, ppid_of(s.pid))
    s:kill(); s:join()
  end)

  it("gives a forked child a server of its own", function()
    local p = ctx.Process{target = function() end}
    p:start(); p:join()                        -- this process's server exists
    local q = luamp.Queue()
    local f = luamp.get_context("fork").Process{target = function()
      local c = ctx.Process{target = function() luamp.sleep(30) end}
      c:start()
      q:put({luamp.getpid(), ppid_of(c.pid)})
      c:kill(); c:join()
      q:put(c.exitcode)
    end}
    f:start()
    local ids = q:get(true, 30)
    assert.equal(-9, q:get(true, 30))
    f:join()
    assert.equal(0, f.exitcode)
    local s = ctx.Process{target = function() luamp.sleep(30) end}
    s:start()
    local mine = ppid_of(s.pid)
    s:kill(); s:join()
    assert.are_not.equal(mine, ids[2])
    assert.are_not.equal(ids[1], ids[2])
  end)

  it("runs Pool workers: upvalues, results, WorkerLost and a replacement", function()
    local pool <close> = ctx.Pool(2)
    local k = 10
    assert.same({10, 20, 30, 40, n = 4}, pool:map(function(x) return x * k end, {1, 2, 3, 4}))
    local e = H.raises("WorkerLost", pool.apply, pool, function() os_exit(3) end)
    assert.equal(3, e.exitcode)
    assert.equal(12, pool:apply(function(a, b) return a + b end, {5, 7}))
    FORKSERVER_POOL_GLOBAL = 1
    local g = _G
    assert.is_nil(pool:apply(function() return g.FORKSERVER_POOL_GLOBAL end))
    FORKSERVER_POOL_GLOBAL = nil
    -- a worker leads its group: a process it started goes with it when it is lost
    local q = luamp.Queue()
    local e2 = H.raises("WorkerLost", pool.apply, pool, function(q2)
      local c = luamp.get_context("fork").Process{target = function() luamp.sleep(30) end}
      c:start()
      q2:put(c.pid)
      -- killed: no end-of-program join of c; the reaper (the server) kills the group
      os_execute("kill -9 " .. luamp.getpid())
    end, {q})
    assert.equal(-9, e2.exitcode)
    assert.is_true(gone(q:get(true, 30)), "the lost worker's child lived on")
  end)
end)

-- The Pools of the two methods whose workers do not share the parent's memory by fork:
-- the workers' settings travel as args (they were lost: a timed task never timed out and
-- a worker never retired after maxtasksperchild).
for _, method in ipairs{"spawn", "forkserver"} do
  describe(method .. " Pool", function()
    local ctx = luamp.get_context(method)

    it("enforces per-task timeouts (map, apply_async, imap) and replaces the killed worker", function()
      local pool <close> = ctx.Pool(2)
      local e = H.raises("Timeout", pool.map, pool, function(x)
        if x == 2 then luamp.sleep(60) end
        return x
      end, {1, 2, 3}, {timeout = 0.3, chunksize = 1})
      assert.truthy(e.message:find("task 2", 1, true), e.message)
      local r = pool:apply_async(function() luamp.sleep(60) end, {}, {timeout = 0.2})
      H.raises("Timeout", r.get, r, 30)
      local got = {}
      local it = pool:imap(function(x)
        if x == 1 then luamp.sleep(60) end
        return x * 2
      end, {1, 2, 3}, {timeout = 0.3})
      local ok, e3 = pcall(it)
      assert.is_false(ok)
      assert.equal("Timeout", e3.kind)
      for v in it do got[#got + 1] = v end
      assert.same({4, 6}, got)
      assert.same({1, 4, 9, n = 3}, pool:map(function(x) return x * x end, {1, 2, 3}, {timeout = 30}))
    end)

    it("retires a worker after maxtasksperchild tasks", function()
      local pool <close> = ctx.Pool{processes = 1, maxtasksperchild = 1}
      local pids = pool:map(function() return luamp.getpid() end, {1, 2, 3}, {chunksize = 1})
      assert.are_not.equal(pids[1], pids[2])
      assert.are_not.equal(pids[2], pids[3])
    end)
  end)
end
