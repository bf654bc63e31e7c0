-- Start methods: set_start_method / get_context, and the spawn method (a fresh luamp
-- interpreter that receives the target through the codec on an inherited descriptor).
local H = require "spec.helper"
local luamp = H.luamp

-- Runs a script in the luamp host; returns stdout, stderr, exit code.
local function host(src)
  local path = H.script(src)
  local out, err, code = H.run({path})
  os.remove(path)
  return out, err, code, path
end

describe("start methods", function()
  it("lists fork, spawn and forkserver; fork is the default", function()
    assert.same({"fork", "spawn", "forkserver"}, luamp.get_all_start_methods())
    local out, err, code = host [[
      print(luamp.get_start_method(true), luamp.get_start_method(), luamp.get_start_method(true))
    ]]
    assert.equal(0, code, err)
    assert.equal("nil\tfork\tfork\n", out)
  end)

  it("follows Python's rules for a second set_start_method", function()
    local out, err, code = host [[
      luamp.set_start_method("spawn")
      local ok, e = pcall(luamp.set_start_method, "fork")
      print(luamp.get_start_method(), ok, e.kind)
      luamp.set_start_method("fork", true)
      print(luamp.get_start_method())
    ]]
    assert.equal(0, code, err)
    assert.equal("spawn\tfalse\tValue\nfork\n", out)
  end)

  it("raises Value naming the three methods for an unknown one", function()
    for _, name in ipairs{"get_context", "set_start_method"} do
      local e = H.raises("Value", luamp[name], "bogus")
      for _, m in ipairs{"fork", "spawn", "forkserver"} do
        assert.truthy(e.message:find(m, 1, true), e.message)
      end
    end
  end)

  it("get_context gives the constructors, called with a dot", function()
    local ctx = luamp.get_context("spawn")
    for _, name in ipairs{"Process", "Pool", "Queue", "SimpleQueue", "JoinableQueue", "Pipe",
                          "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Event",
                          "Condition", "Barrier", "Value", "Array"} do
      assert.equal("function", type(ctx[name]), name)
    end
    assert.equal("spawn", ctx.get_start_method())
    assert.equal("function", type(ctx.Manager))
    local q = ctx.Queue(); q:put(1); assert.equal(1, q:get())
    local l = ctx.Lock(); l:acquire(); l:release()
    assert.equal("fork", luamp.get_context().get_start_method())
  end)
end)

describe("spawn", function()
  local ctx = luamp.get_context("spawn")
  -- targets made here use no globals: busted runs a spec file in an environment of its
  -- own, which would travel by value
  local os_exit = os.exit

  it("runs the target in a fresh interpreter: its own globals, the target's upvalues", function()
    local out, err, code = host [[
      PARENT_GLOBAL = "parent"
      local up = {n = 41}
      local ctx = luamp.get_context("spawn")
      local p = ctx.Process{target = function(k)
        print(PARENT_GLOBAL, up.n + k, luamp.current_process().name, luamp.parent_process().name)
      end, args = {1}, name = "kid"}
      p:start(); p:join()
      print("exit", p.exitcode)
    ]]
    assert.equal(0, code, err)
    assert.equal("nil\t42\tkid\tMainProcess\nexit\t0\n", out)
  end)

  it("does not run the parent's script again", function()
    local out, err, code = host [[
      print("script")
      luamp.set_start_method("spawn")
      local p = luamp.Process{target = function() print("child") end}
      p:start(); p:join()
    ]]
    assert.equal(0, code, err)
    assert.equal("script\nchild\n", out)
  end)

  it("requires modules by name in the child with the parent's package.path", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir " .. H.q(dir)))
    local f = assert(io.open(dir .. "/spawnmod_x.lua", "w"))
    f:write('print("loading spawnmod_x") return {where = function() return "module" end}\n')
    f:close()
    local out, err, code = host(([[
      package.path = %q .. "/?.lua;" .. package.path
      local m = require "spawnmod_x"
      local p = luamp.get_context("spawn").Process{target = function() print(m.where()) end}
      p:start(); p:join()
      print("exit", p.exitcode)
    ]]):format(dir))
    os.execute("rm -r " .. H.q(dir))
    assert.equal(0, code, err)
    assert.equal("loading spawnmod_x\nloading spawnmod_x\nmodule\nexit\t0\n", out)
  end)

  it("prints a child's error with the process name and the parent's file and line", function()
    local _, err, code, path = host [[
      local p = luamp.get_context("spawn").Process{name = "bad", target = function()
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

  it("gives exit codes, terminate, kill and a sentinel as with fork", function()
    local p = ctx.Process{target = function() os_exit(7) end}
    p:start(); p:join()
    assert.equal(7, p.exitcode)
    local r, w = luamp.Pipe(false)
    local q = ctx.Process{target = function() luamp.sleep(30) end}
    q:start()
    assert.is_true(q:is_alive())
    assert.same({}, luamp.wait({q.sentinel}, 0))
    q:terminate()
    assert.same({q.sentinel}, luamp.wait({q.sentinel}, 10))
    q:join()
    assert.equal(-15, q.exitcode)
    local k = ctx.Process{target = function() luamp.sleep(30) end}
    k:start(); k:kill(); k:join()
    assert.equal(-9, k.exitcode)
    r:close(); w:close()
  end)

  it("gives the child the parent's authkey (or the one set on the Process), as Python does", function()
    for _, m in ipairs{"spawn", "forkserver"} do
      local out, err, code = host(([[
        local ctx = luamp.get_context("%s")
        local q = ctx.Queue()
        local function report(q2)
          local key = luamp.current_process().authkey
          -- a fork grandchild inherits it from there
          local g = luamp.Process{target = function() q2:put(luamp.current_process().authkey) end}
          g:start(); g:join()
          q2:put(key)
        end
        local p = ctx.Process{target = report, args = {q}}
        p:start()
        local grand, key = q:get(true, 30), q:get(true, 30)
        p:join()
        local mine = luamp.current_process().authkey
        print(#mine, key == mine, grand == mine)
        local p2 = ctx.Process{target = report, args = {q}}
        p2.authkey = "set before start"
        p2:start()
        print(q:get(true, 30), q:get(true, 30))
        p2:join()
      ]]):format(m))
      assert.equal(0, code, m .. ": " .. err)
      assert.equal("32\ttrue\ttrue\nset before start\tset before start\n", out, m)
    end
  end)

  it("passes luamp objects in args with their descriptors (Queue, Lock, Value, Pipe)", function()
    local q, lock, v = ctx.Queue(), ctx.Lock(), ctx.Value("i", 0)
    local a, b = ctx.Pipe()
    local p = ctx.Process{target = function(q2, l2, v2, b2)
      l2:acquire(); v2:add(5); l2:release()
      q2:put({"from spawn", b2:recv()})
      b2:send("bye")
    end, args = {q, lock, v, b}}
    p:start()
    a:send(42)
    assert.same({"from spawn", 42}, q:get(true, 30))
    assert.equal("bye", a:recv())
    p:join()
    assert.equal(0, p.exitcode)
    assert.equal(5, v.value)
    a:close(); b:close()
  end)

  it("runs Pool workers by spawn: upvalues, results, WorkerLost and a replacement", function()
    local pool <close> = ctx.Pool(2)
    local k = 10
    assert.same({10, 20, 30, 40, n = 4}, pool:map(function(x) return x * k end, {1, 2, 3, 4}))
    local e = H.raises("WorkerLost", pool.apply, pool, function() os_exit(3) end)
    assert.equal(3, e.exitcode)
    assert.equal(12, pool:apply(function(a, b) return a + b end, {5, 7}))
    -- a spawn worker is a fresh interpreter: the spec's globals are not there
    SPAWN_POOL_GLOBAL = 1
    local g = _G
    assert.is_nil(pool:apply(function() return g.SPAWN_POOL_GLOBAL end))
    SPAWN_POOL_GLOBAL = nil
  end)

  -- Compiling every part of luamp was most of a spawn child's start (luamp.main).
  it("loads the parts of luamp on first use: a child compiles only what it uses", function()
    local out, err, code = host [[
      local p = luamp.get_context("spawn").Process{target = function()
        local loaded = package.loaded
        print(loaded["luamp.pool"], loaded["luamp.manager"], loaded["luamp.sync"])
        local m = require "luamp"
        print(type(m.Lock), loaded["luamp.sync"] ~= nil, loaded["luamp.manager"])
        m.Manager = "mine"                 -- a name the program set is kept
        local n = 0
        for _ in pairs(m) do n = n + 1 end -- pairs sees every part
        print(n > 50, loaded["luamp.manager"] ~= nil, m.Manager, m.no_such_name)
      end}
      p:start(); p:join()
      print("exit", p.exitcode)
    ]]
    assert.equal(0, code, err)
    assert.equal("nil\tnil\tnil\nfunction\ttrue\tnil\ntrue\ttrue\tmine\tnil\nexit\t0\n", out)
  end)

  it("opens luamp's C parts and the trace module on first use: a plain child starts lean", function()
    local out, err, code = host [[
      local p = luamp.get_context("spawn").Process{target = function()
        -- measured at the target's start: 134 KB when every C part and luamp.trace were
        -- built in each child, 94 KB when they wait for their first use
        local kb = collectgarbage("count")
        local core = package.loaded["luamp._core"]
        print(kb < 110, rawget(core, "queue_new"), package.loaded["luamp.trace"])
        local m = require "luamp"
        -- the codec's map of named C functions, built before the parts opened, still
        -- finds theirs after
        assert(core.loadx((core.dumpx(string.format))) == string.format)
        local q = m.Queue()
        q:put("x")
        print(q:get(), rawget(core, "queue_new") ~= nil, core.loadx((core.dumpx(core.queue_new))) == core.queue_new)
      end}
      p:start(); p:join()
      print("exit", p.exitcode)
    ]]
    assert.equal(0, code, err)
    assert.equal("true\tnil\tnil\nx\ttrue\ttrue\nexit\t0\n", out)
  end)

  it("loads a part again when loading it raised (Ctrl-C while it compiled)", function()
    local out, err, code = host [[
      print(package.loaded["luamp.manager"] == nil)
      local orig = package.preload["luamp.manager"]
      package.preload["luamp.manager"] = function(...)
        package.preload["luamp.manager"] = orig
        error("interrupted while compiling")
      end
      local ok, e = pcall(function() return luamp.Manager end)
      print(ok, tostring(e):match("interrupted while compiling") ~= nil)
      print(type(luamp.Manager), type(luamp.BaseManager))
    ]]
    assert.equal(0, code, err)
    assert.equal("true\nfalse\ttrue\nfunction\tfunction\n", out)
  end)

  it("runs the subclass style (run with fields)", function()
    local p = ctx.Process{run = function(self) os_exit(self.code) end, code = 5}
    p:start(); p:join()
    assert.equal(5, p.exitcode)
  end)

  it("kills a daemon child with its parent", function()
    local out, err, code = host [[
      local p = luamp.get_context("spawn").Process{daemon = true, target = function()
        luamp.sleep(30)
      end}
      p:start()
      print(p.pid)
      io.stdout:flush()
      -- killed at once: a child that has not reached its prctl yet sees the parent gone
      os.execute("kill -9 " .. luamp.getpid())
    ]]
    assert.truthy(code == -9 or code == 137, err)
    local pid = tonumber(out)
    -- the child's pid is gone (or a zombie of init) within a few seconds
    local t0 = luamp.time()
    local alive = true
    while luamp.time() - t0 < 10 do
      local st = io.open("/proc/" .. pid .. "/stat")
      local s = st and st:read("a")
      if st then st:close() end
      if not s or s:match("^%d+ %b() Z") then alive = false; break end
      luamp.sleep(0.02)
    end
    assert.is_false(alive)
  end)

  it("raises at start() when the executable is missing, and starts nothing", function()
    local out, err, code = host [[
      luamp.set_executable("/nonexistent/luamp")
      local p = luamp.get_context("spawn").Process{target = print}
      local ok, e = pcall(p.start, p)
      print(ok, e.kind, e.message)
      print(#luamp.active_children())
    ]]
    assert.equal(0, code, err)
    assert.truthy(out:find("^false\tValue\tcannot start a process: /nonexistent/luamp"), out)
    assert.truthy(out:find("No such file", 1, true), out)
    assert.truthy(out:find("\n0\n$"), out)
  end)

  it("exits with a message, running nothing, on garbage on the start descriptor", function()
    local marker = os.tmpname()
    os.remove(marker)
    -- a well-formed frame whose message carries a function in its plain-data shell
    local evil = luamp.dumps({v = 1, path = "", cpath = "", parent_pid = 1,
      body = "x", f = function() io.open(marker, "w"):close() end})
    local function frame(msg)
      local n = #msg
      local len = ""
      for _ = 1, 8 do len = len .. string.char(n % 256); n = n // 256 end
      return "LUAMPSP1" .. len .. msg
    end
    local cases = {
      {"", "no start message"},
      {"garbage garbage garbage", "bad magic"},
      {"LUAMPSP1\255\255\255\255\255\255\255\127", "length out of range"},
      {frame("abc"):sub(1, 18), "truncated"},
      {frame("\1\2\3 not a message"), "malformed start message"},
      {frame(evil), "malformed start message"},
    }
    for _, case in ipairs(cases) do
      local input = os.tmpname()
      local f = assert(io.open(input, "wb")); f:write(case[1]); f:close()
      local errf = os.tmpname()
      local _, code = H.sh(H.q(H.host) .. " --luamp-spawn-child 3 3< " .. H.q(input) .. " 2> " .. errf)
      f = assert(io.open(errf)); local err = f:read("a"); f:close()
      os.remove(input); os.remove(errf)
      assert.equal(2, code, case[2] .. ": " .. err)
      assert.truthy(err:find("luamp: spawn child: ", 1, true), err)
      assert.truthy(err:find(case[2], 1, true), case[2] .. ": " .. err)
    end
    assert.is_nil(io.open(marker), "code from the start message ran")
  end)
end)

describe("the seed's spawn example", function()
  it("spawn_start_method: the child opens the file itself; the parent's global is not there", function()
    assert.equal("I M A SON PROCESS START WITH SPAWN:\n" ..
      "the parent's global f in the child:\tnil\n" ..
      "-- Port of the seeds' start-method example: the child is started with `spawn`, a fresh\n" ..
      "start method:\tspawn\texitcode:\t0\n", H.example("spawn_start_method.lua"))
  end)
end)
