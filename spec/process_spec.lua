local H = require "helper"
local luamp = H.luamp
local core = luamp._core

-- Runs a script in the luamp host; returns stdout, stderr, exit code.
local function host(src, ...)
  local path = H.script(src)
  local out, err, code = H.run({path, ...})
  os.remove(path)
  return out, err, code
end

local function count(s, pat)
  local n = 0
  for _ in s:gmatch(pat) do n = n + 1 end
  return n
end

describe("Process", function()
  it("runs the target with its args in a child and reports exitcode 0", function()
    local out, _, code = host [[
      local p = luamp.Process{target = function(a, b, c) print("child", a, b, c, luamp.getpid() ~= luamp.getppid()) end,
                              args = {1, "two", 3}}
      p:start(); p:join()
      print("exit", p.exitcode)
    ]]
    assert.equal(0, code)
    assert.equal("child\t1\ttwo\t3\ttrue\nexit\t0\n", out)
  end)

  it("passes nil arguments when args has n", function()
    local p = luamp.Process{target = function(a, b, c) os.exit((a == nil and b == 2 and c == nil) and 5 or 6) end,
                            args = table.pack(nil, 2, nil)}
    p:start(); p:join()
    assert.equal(5, p.exitcode)
  end)

  it("reports 1 and prints the process name and traceback when the target raises", function()
    local _, err = host [[
      local p = luamp.Process{target = function() error("kaboom") end, name = "worker-a"}
      p:start(); p:join()
      io.stderr:write("code=", p.exitcode, "\n")
    ]]
    assert.truthy(err:find("Process worker-a:\n", 1, true))
    assert.truthy(err:find("kaboom", 1, true))
    assert.truthy(err:find("stack traceback", 1, true))
    assert.truthy(err:find("code=1", 1, true))
    -- the child's traceback stops at the target: the parent's main chunk is not in it
    assert.is_nil(err:match("Process worker%-a:.-in main chunk.-code=1"))
  end)

  it("reports os.exit(n) as exitcode n, and os.exit(false) as 1", function()
    local p = luamp.Process{target = function() os.exit(42) end}
    p:start(); p:join()
    assert.equal(42, p.exitcode)
    p = luamp.Process{target = function() os.exit(false) end}
    p:start(); p:join()
    assert.equal(1, p.exitcode)
  end)

  it("leaves os.exit in the parent as Lua's: its code, and the state closed when asked", function()
    local script = H.script([[
      local luamp = require "luamp"
      local p = luamp.Process{target = function()
        -- the child's os.exit runs none of the parent's finalizers
        setmetatable({}, {__gc = function() io.write("child finalizer ") end})
        os.exit(7, true)
      end}
      p:start(); p:join()
      local q = luamp.Process{target = function() print("from q") end}
      q:start(); q:join()
      io.write(p.exitcode, " ", q.exitcode, "\n")
      setmetatable({}, {__gc = function() io.write("closed\n") end})
      os.exit(3, true)
    ]])
    local out, err, code = H.run({script})
    os.remove(script)
    assert.equal(3, code, err)
    assert.equal("from q\n7 0\nclosed\n", out)
  end)

  it("reports -signal for terminate and kill", function()
    local p = luamp.Process{target = function() luamp.sleep(60) end}
    p:start(); p:terminate(); p:join()
    assert.equal(-15, p.exitcode)
    p = luamp.Process{target = function() luamp.sleep(60) end}
    p:start(); p:kill(); p:join()
    assert.equal(-9, p.exitcode)
  end)

  it("exitcode is nil while running; is_alive follows the child", function()
    local p = luamp.Process{target = function() luamp.sleep(60) end}
    assert.is_false(p:is_alive())
    assert.is_nil(p.exitcode)
    p:start()
    assert.is_true(p:is_alive())
    assert.is_nil(p.exitcode)
    p:kill(); p:join()
    assert.is_false(p:is_alive())
  end)

  it("join with a timeout returns when the timeout passes; 0 and negative poll", function()
    local p = luamp.Process{target = function() luamp.sleep(60) end}
    p:start()
    local t0 = luamp.time()
    p:join(0.2)
    local dt = luamp.time() - t0
    assert.is_true(dt >= 0.2 and dt < 5, "join(0.2) took " .. dt)
    assert.is_nil(p.exitcode)
    t0 = luamp.time()
    p:join(0); p:join(-1)
    assert.is_true(luamp.time() - t0 < 1)
    assert.is_true(p:is_alive())
    p:kill(); p:join()
    p:join(); p:join(0)   -- joining again is fine
    assert.equal(-9, p.exitcode)
  end)

  it("start twice raises Value", function()
    local p = luamp.Process{target = function() end}
    p:start()
    H.raises("Value", p.start, p)
    p:join()
  end)

  it("methods before start raise Value; sentinel too", function()
    local p = luamp.Process{target = function() end}
    H.raises("Value", p.join, p)
    H.raises("Value", p.terminate, p)
    H.raises("Value", p.kill, p)
    H.raises("Value", function() return p.sentinel end)
  end)

  it("close refuses a running process and afterwards every method but close raises Value", function()
    local p = luamp.Process{target = function() luamp.sleep(60) end}
    p:start()
    H.raises("Value", p.close, p)
    p:kill(); p:join()
    p:close()
    p:close()
    for _, m in ipairs{"start", "join", "is_alive", "terminate", "kill"} do
      H.raises("Value", p[m], p)
    end
    H.raises("Value", function() return p.pid end)
    H.raises("Value", function() return p.exitcode end)
    assert.truthy(tostring(p):find("closed"))
  end)

  it("has a sentinel fd that becomes readable when the child ends", function()
    local p = luamp.Process{target = function() luamp.sleep(60) end}
    p:start()
    local fd = p.sentinel
    assert.is_number(fd)
    assert.same({}, core.wait_fds({fd}, 0))
    p:terminate()
    assert.same({fd}, core.wait_fds({fd}, 10))
    p:join()
  end)

  it("names processes Process-N by default and takes a name", function()
    local a, b = luamp.Process{target = print}, luamp.Process{target = print, name = "w1"}
    assert.truthy(a.name:match("^Process%-%d+$"))
    assert.equal("w1", b.name)
    b.name = "renamed"
    assert.equal("renamed", b.name)
    assert.truthy(tostring(b):match("^<Process name=renamed initial>$"))
  end)

  it("tostring shows pid and state", function()
    local p = luamp.Process{target = function() end, name = "t"}
    p:start(); p:join()
    assert.truthy(tostring(p):match("^<Process name=t pid=%d+ stopped exitcode=0>$"), tostring(p))
  end)

  it("supports the run style with extra fields on the object", function()
    local out = host [[
      local p = luamp.Process{run = function(self) print("run", self.n * 2, self.name) end, n = 21, name = "R"}
      p:start(); p:join()
    ]]
    assert.equal("run\t42\tR\n", out)
  end)

  it("rejects unknown options and bad targets", function()
    H.raises("Value", luamp.Process, {taget = print})
    H.raises("Value", luamp.Process, {target = 42})
    H.raises("Value", luamp.Process, {target = print, args = "x"})
  end)

  it("daemon can only be set before start", function()
    local p = luamp.Process{target = function() end}
    p.daemon = true
    assert.is_true(p.daemon)
    p.daemon = false
    p:start()
    H.raises("Value", function() p.daemon = true end)
    p:join()
  end)
end)

describe("process functions", function()
  it("current_process is MainProcess in the main process and the Process in a child", function()
    assert.equal("MainProcess", luamp.current_process().name)
    assert.equal(luamp.getpid(), luamp.current_process().pid)
    assert.is_nil(luamp.parent_process())
    local out = host [[
      local p = luamp.Process{target = function()
        local me, parent = luamp.current_process(), luamp.parent_process()
        print(me.name, me.pid == luamp.getpid(), parent.name, parent.pid == luamp.getppid(), parent:is_alive())
      end, name = "kid"}
      p:start(); p:join()
    ]]
    assert.equal("kid\ttrue\tMainProcess\ttrue\ttrue\n", out)
  end)

  it("names grandchildren after their parent", function()
    local out = host [[
      local p = luamp.Process{target = function()
        local q = luamp.Process{target = function() print(luamp.current_process().name, luamp.parent_process().name) end}
        q:start(); q:join()
      end}
      p:start(); p:join()
      print(p.name)
    ]]
    local child = out:match("\n(Process%-%d+)\n$")
    assert.truthy(child)
    assert.equal(child .. ":1\t" .. child .. "\n" .. child .. "\n", out)
  end)

  it("active_children lists running children only", function()
    local p = luamp.Process{target = function() luamp.sleep(60) end}
    p:start()
    local found = false
    for _, c in ipairs(luamp.active_children()) do found = found or c == p end
    assert.is_true(found)
    p:kill(); p:join()
    for _, c in ipairs(luamp.active_children()) do assert.not_equal(p, c) end
  end)

  it("cpu_count, getpid, getppid, time and sleep", function()
    assert.is_true(luamp.cpu_count() >= 1)
    assert.equal(H.sh("echo $PPID"):gsub("%s", ""), tostring(luamp.getpid()))
    local t0 = luamp.time()
    luamp.sleep(0.05)
    assert.is_true(luamp.time() - t0 >= 0.05)
    H.raises("Value", luamp.sleep, -1)
  end)

  it("has the fork start method by default", function()
    assert.equal("fork", luamp.get_start_method())
    assert.same({"fork", "spawn", "forkserver"}, luamp.get_all_start_methods())
    H.raises("Value", luamp.set_start_method, "bogus")
  end)
end)

describe("fork discipline", function()
  it("flushes buffered output before fork so nothing prints twice", function()
    local out = host [[
      io.write("before ")     -- stays in stdio's buffer: stdout is a pipe
      local p = luamp.Process{target = function() io.write("child ") end}
      p:start(); p:join()
      io.write("after\n")
    ]]
    assert.equal("before child after\n", out)
  end)

  it("the child never runs the parent's remaining code or its finalizers", function()
    local out = host [[
      local guard <close> = setmetatable({}, {__close = function() print("closed in", luamp.getpid()) end})
      setmetatable({}, {__gc = function() print("gc in", luamp.getpid()) end})
      local p = luamp.Process{target = function() print("child") end}
      p:start(); p:join()
      local q = luamp.Process{target = function() os.exit(3) end}
      q:start(); q:join()
      print("parent done", luamp.getpid())
    ]]
    local pid = out:match("parent done\t(%d+)")
    assert.truthy(pid)
    assert.equal(1, count(out, "child\n"))
    assert.equal(1, count(out, "parent done"))
    assert.equal(1, count(out, "closed in"))
    assert.truthy(out:find("closed in\t" .. pid, 1, true))
    for gc_pid in out:gmatch("gc in\t(%d+)") do assert.equal(pid, gc_pid) end
  end)

  it("leaves no zombie after join", function()
    local p = luamp.Process{target = function() end}
    p:start()
    local pid = p.pid
    p:join()
    assert.is_nil(io.open("/proc/" .. pid .. "/stat"))
  end)

  it("never reaps children it did not start", function()
    local f = io.popen("sleep 0.3; exit 7")
    local p = luamp.Process{target = function() end}
    p:start(); p:join()
    local _, _, code = f:close()
    assert.equal(7, code)
  end)

  it("joins non-daemon children when the main script ends", function()
    local out = host [[
      local p = luamp.Process{target = function() luamp.sleep(0.3); print("child finished") end}
      p:start()
      print("main finished")
    ]]
    assert.equal("main finished\nchild finished\n", out)
  end)

  it("joins children of stock lua5.4 too", function()
    local path = H.script [[
      local luamp = require "luamp"
      local p = luamp.Process{target = function() luamp.sleep(0.2); print("child finished") end}
      p:start()
      print("main finished")
    ]]
    local out = H.sh(H.stock_lua() .. " " .. path)
    os.remove(path)
    assert.equal("main finished\nchild finished\n", out)
  end)

  it("terminates daemon children when the main script ends", function()
    local out = host [[
      local p = luamp.Process{target = function() luamp.sleep(60) end, daemon = true}
      p:start()
      print(p.pid)
    ]]
    local pid = assert(tonumber(out:match("(%d+)")))
    assert.is_nil(io.open("/proc/" .. pid .. "/stat"), "daemon still running")
  end)

  it("a daemon child dies with its parent even when the parent is killed", function()
    local path = H.script [[
      local p = luamp.Process{target = function() luamp.sleep(60) end, daemon = true}
      p:start()
      print(luamp.getpid(), p.pid)
      io.stdout:flush()
      luamp.sleep(60)
    ]]
    local f = io.popen("exec " .. H.q(H.host) .. " " .. path)
    local parent, daemon = f:read("n", "n")
    os.execute("kill -9 " .. parent)
    f:close()
    os.remove(path)
    local fd = core.pidfd_open(daemon)
    if fd then   -- nil when it is already gone
      assert.same({fd}, core.wait_fds({fd}, 10), "daemon survived its parent")
      core.close_fd(fd)
    end
  end)

  it("a daemon cannot start children", function()
    local out = host [[
      local p = luamp.Process{daemon = true, target = function()
        local ok, err = pcall(function() luamp.Process{target = print}:start() end)
        print(ok, err.kind)
      end}
      p:start(); p:join()
    ]]
    assert.equal("false\tValue\n", out)
  end)

  it("a Process object dropped while running is still joined at the end", function()
    local out = host [[
      do luamp.Process{target = function() luamp.sleep(0.2); print("orphan done") end}:start() end
      collectgarbage(); collectgarbage()
      print("main done")
    ]]
    assert.equal("main done\norphan done\n", out)
  end)
end)

describe("unjoined children", function()
  -- Runs src in the host under `ulimit -n <limit>`; returns stdout, stderr, exit code.
  local function limited(limit, src)
    local path = H.script(src)
    local errf = os.tmpname()
    local out, code = H.sh(string.format("sh -c 'ulimit -n %d; exec %s %s' < /dev/null 2> %s",
      limit, H.host, path, errf))
    local f = io.open(errf); local err = f:read("a"); f:close()
    os.remove(path); os.remove(errf)
    return out, err, code
  end

  -- Bounded exactly: every child that ended is reaped, its pidfd closed, by the next
  -- start or by active_children(); only the children still running when active_children()
  -- looked may hold a descriptor (their pidfd) each, or become zombies. Counted in-process
  -- (H.fd_count), before and after, with whatever the first start and join make lazily
  -- already made. (It counted with `ls` through io.popen, which sometimes saw popen's own
  -- pipe end, against a bound of 80 that some 70 leaked descriptors would have passed.)
  it("600 fire-and-forget starts under ulimit -n 256 leave fds and zombies bounded", function()
    local out, err, code = limited(256, string.format([[
      package.path = %q .. "/spec/?.lua;" .. package.path
      local fd_count = require("helper").fd_count
      collectgarbage("stop")   -- the collector must not be what frees them
      local first = luamp.Process{target = function() end}
      first:start(); first:join()
      local before = fd_count()
      for _ = 1, 600 do luamp.Process{target = function() end}:start() end
      local running = #luamp.active_children()
      local fds = fd_count()
      local a, b = luamp.Pipe()
      a:send("pipe ok")
      local q = luamp.Queue()
      q:put("queue ok")
      print(b:recv(), q:get())
      local ps = io.popen("ps -o stat= --ppid " .. luamp.getpid())
      local zombies = 0
      for line in ps:lines() do if line:find("Z") then zombies = zombies + 1 end end
      ps:close()
      print("running", running, "zombies", zombies, "fds", fds - before)
    ]], H.root))
    assert.equal(0, code, err)
    assert.truthy(out:find("pipe ok\tqueue ok\n", 1, true), out)
    local running, zombies, fds = out:match("running\t(%d+)\tzombies\t(%d+)\tfds\t(%-?%d+)")
    assert.truthy(running, out)
    assert.is_true(tonumber(zombies) <= tonumber(running), out)
    assert.is_true(tonumber(fds) <= tonumber(running), out)
  end)

  it("start() with no free fd raises Value and starts nothing", function()
    local out, err, code = limited(64, [[
      local files = {}
      while true do
        local f = io.open("/dev/null")
        if not f then break end
        files[#files + 1] = f
      end
      local ok, e = pcall(function() luamp.Process{target = function() print("ran") end}:start() end)
      print(ok, type(e) == "table" and e.kind, tostring(e))
      files[#files]:close(); files[#files] = nil
      files[#files]:close(); files[#files] = nil
      local p = luamp.Process{target = function() end}
      p:start(); p:join()
      print("after", p.exitcode)
    ]])
    assert.equal(0, code, err)
    assert.falsy(out:find("ran"), out)
    assert.truthy(out:find("^false\tValue\tluamp%.Value: cannot start a process: Too many open files\n"), out)
    assert.truthy(out:find("\nafter\t0\n"), out)
  end)

  it("a sentinel taken before the child was reaped by a later start stays open", function()
    local p = luamp.Process{target = function() end}
    p:start()
    local s = p.sentinel
    assert.same({s}, core.wait_fds({s}, 10))
    for _ = 1, 3 do luamp.Process{target = function() end}:start() end   -- these reap p
    assert.same({s}, core.wait_fds({s}, 0))
    local link = io.popen("readlink /proc/" .. luamp.getpid() .. "/fd/" .. s):read("l")
    assert.equal("anon_inode:[pidfd]", link)
    assert.equal(0, p.exitcode)
  end)

  it("a child reaped by a later start keeps its exitcode and gives a ready sentinel", function()
    local p = luamp.Process{target = function() os.exit(7) end}
    p:start()
    local fd = core.pidfd_open(p.pid)   -- watched from outside: p's own sentinel is not asked
    if fd then assert.same({fd}, core.wait_fds({fd}, 10)); core.close_fd(fd) end
    local q = luamp.Process{target = function() end}
    q:start()                            -- reaps p
    assert.is_nil(io.open("/proc/" .. p.pid .. "/stat"), "p was not reaped")
    assert.equal(7, p.exitcode)
    assert.is_false(p:is_alive())
    p:join()
    local s = p.sentinel
    assert.same({s}, core.wait_fds({s}, 0))
    assert.same({p}, luamp.wait({p}, 0))
    q:join()
    p:close()
  end)
end)
