-- luamp.subprocess: run, call, check_call, check_output, Popen and its streams.
local H = require "helper"
local luamp = H.luamp
local sp = luamp.subprocess

-- The state letter of a process in /proc ("R", "S", "Z"...), or nil once it is gone.
local function proc_state(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local line = f:read("a")
  f:close()
  return line:match("^%d+ %(.*%) (%a)")
end

-- True once pid has ended (gone, or a zombie whose reaping is up to someone else),
-- looking for up to `secs` seconds: a kill takes effect asynchronously.
local function ends_within(pid, secs)
  local deadline = luamp.time() + secs
  repeat
    local s = proc_state(pid)
    if s == nil or s == "Z" then return true end
    luamp.sleep(0.01)
  until luamp.time() > deadline
  return false
end

local function tmpfile(content)
  local path = os.tmpname()
  if content then
    local f = assert(io.open(path, "wb"))
    f:write(content)
    f:close()
  end
  return path
end

local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local all_bytes = {}
for i = 0, 255 do all_bytes[#all_bytes + 1] = string.char(i) end
all_bytes = table.concat(all_bytes)

describe("subprocess.run", function()
  it("returns args, returncode, stdout and stderr, with a readable tostring", function()
    local args = {"sh", "-c", "echo out; echo err >&2; exit 3"}
    local r = sp.run(args, {capture_output = true})
    assert.equal(args, r.args)
    assert.equal(3, r.returncode)
    assert.equal("out\n", r.stdout)
    assert.equal("err\n", r.stderr)
    assert.equal('CompletedProcess(args="sh -c \\"echo out; echo err >&2; exit 3\\"", '
      .. 'returncode=3, stdout="out\\n", stderr="err\\n")', tostring(r))
  end)

  it("leaves output alone unless asked to capture it", function()
    local r = sp.run({"sh", "-c", "exit 0"})
    assert.equal(0, r.returncode)
    assert.is_nil(r.stdout)
    assert.is_nil(r.stderr)
  end)

  it("check = true raises CalledProcess with returncode, stdout, stderr and the command", function()
    local args = {"sh", "-c", "echo o; echo e >&2; exit 3"}
    local e = H.raises("CalledProcess", sp.run, args, {capture_output = true, check = true})
    assert.equal(3, e.returncode)
    assert.equal("o\n", e.stdout)
    assert.equal("e\n", e.stderr)
    assert.equal(args, e.cmd)
    assert.equal(args, e.args)
    assert.truthy(tostring(e):find("exit status 3", 1, true))
    assert.equal(0, sp.run({"true"}, {check = true}).returncode)
  end)

  it("feeds input, binary-safe", function()
    local data = all_bytes:rep(4)
    local r = sp.run({"cat"}, {input = data, capture_output = true})
    assert.equal(#data, #r.stdout)
    assert.is_true(r.stdout == data)
    assert.equal("", r.stderr)
  end)

  it("moves 5 MB through cat both ways at once without deadlock", function()
    local data = all_bytes:rep(5 * 4096)
    local r = sp.run({"cat"}, {input = data, capture_output = true})
    assert.equal(#data, #r.stdout)
    assert.is_true(r.stdout == data)
  end)

  it("runs a shell command string with shell = true, and a list as sh's arguments", function()
    assert.equal("a b\n", sp.run("echo a b", {shell = true, capture_output = true}).stdout)
    local r = sp.run({'echo "$0-$1"', "x", "y"}, {shell = true, capture_output = true})
    assert.equal("x-y\n", r.stdout)
  end)

  it("runs `executable` with args[1] as the program's name", function()
    local r = sp.run({"whatever", "hi"}, {executable = "/bin/echo", capture_output = true})
    assert.equal("hi\n", r.stdout)
  end)

  it("runs in cwd", function()
    local r = sp.run({"pwd"}, {cwd = "/", capture_output = true})
    assert.equal("/\n", r.stdout)
  end)

  it("env replaces the environment; env_extra adds to it", function()
    local r = sp.run({"env"}, {env = {A = "1", B = "two words"}, capture_output = true})
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    table.sort(lines)
    assert.same({"A=1", "B=two words"}, lines)

    r = sp.run({"env"}, {env_extra = {LUAMP_EXTRA = "yes"}, capture_output = true})
    assert.truthy(r.stdout:find("\nLUAMP_EXTRA=yes\n", 1, true) or r.stdout:find("^LUAMP_EXTRA=yes\n"))
    assert.truthy(r.stdout:find("PATH=", 1, true))
    assert.is_nil(os.getenv("LUAMP_EXTRA"))
  end)

  it('merges stderr into stdout with stderr = "stdout"', function()
    local r = sp.run({"sh", "-c", "echo one; echo two >&2; echo three"},
      {stdout = "pipe", stderr = "stdout"})
    assert.equal("one\ntwo\nthree\n", r.stdout)
    assert.is_nil(r.stderr)
  end)

  it("writes to and reads from Lua files", function()
    local out = tmpfile()
    local f = assert(io.open(out, "w"))
    f:write("before\n")                       -- still buffered: must land first
    sp.run({"echo", "child"}, {stdout = f})
    f:write("after\n")
    f:close()
    assert.equal("before\nchild\nafter\n", slurp(out))
    os.remove(out)

    local inp = tmpfile("a\nb\n")
    f = assert(io.open(inp, "r"))
    assert.equal("a\nb\n", sp.run({"cat"}, {stdin = f, capture_output = true}).stdout)
    f:close()
    os.remove(inp)
  end)

  it('sends to and reads from /dev/null with "devnull"', function()
    assert.equal("", sp.run({"cat"}, {stdin = "devnull", capture_output = true}).stdout)
    local r = sp.run({"sh", "-c", "echo x; echo y >&2"}, {stdout = "devnull", stderr = "pipe"})
    assert.is_nil(r.stdout)
    assert.equal("y\n", r.stderr)
  end)

  it("kills the child on timeout and raises Timeout promptly", function()
    local t0 = luamp.time()
    local e = H.raises("Timeout", sp.run, {"sleep", "10"}, {timeout = 0.3})
    assert.is_true(luamp.time() - t0 < 3, "took " .. (luamp.time() - t0))
    assert.equal(0.3, e.timeout)
    assert.same({"sleep", "10"}, e.cmd)
  end)

  it("returns promptly on timeout even when a grandchild holds the pipes open", function()
    local t0 = luamp.time()
    local e = H.raises("Timeout", sp.run, {"sh", "-c", "sleep 30 & echo $!"},
      {capture_output = true, timeout = 1})
    assert.is_true(luamp.time() - t0 < 4, "took " .. (luamp.time() - t0))
    -- what was read before the timeout comes with the error
    local grandchild = tonumber(e.stdout:match("^(%d+)\n"))
    assert.truthy(grandchild, e.stdout)
    -- without shell = true the grandchild is not in the child's group: not killed
    assert.equal("S", proc_state(grandchild))
    os.execute("kill " .. grandchild)
  end)

  it("with shell = true, a timeout kills what the shell started too", function()
    local t0 = luamp.time()
    local e = H.raises("Timeout", sp.run, "sleep 30 & echo $!; wait",
      {shell = true, capture_output = true, timeout = 1})
    assert.is_true(luamp.time() - t0 < 4, "took " .. (luamp.time() - t0))
    local grandchild = tonumber(e.stdout:match("^(%d+)\n"))
    assert.truthy(grandchild, e.stdout)
    assert.is_true(ends_within(grandchild, 5), "the shell's child survived the timeout")
  end)

  it("starts a shell in its own process group", function()
    local r = sp.run("echo $$; cut -d' ' -f5 /proc/$$/stat", {shell = true, capture_output = true})
    local pid, pgrp = r.stdout:match("^(%d+)\n(%d+)\n$")
    assert.equal(pid, pgrp)
    -- without shell = true the child stays in ours
    local mine = slurp("/proc/self/stat"):match("^%d+ %(.*%) %a %d+ (%d+)")
    r = sp.run({"sh", "-c", "cut -d' ' -f5 /proc/$$/stat"}, {capture_output = true})
    assert.equal(mine, r.stdout:match("%d+"))
  end)

  it("raises NotFound for a missing program or cwd", function()
    local e = H.raises("NotFound", sp.run, {"luamp-no-such-program"})
    assert.truthy(e.message:find("luamp-no-such-program", 1, true))
    H.raises("NotFound", sp.run, {"/nonexistent/prog"})
    H.raises("NotFound", sp.run, {"luamp-no-such-program"}, {env = {PATH = "/usr/bin:/bin"}})
    e = H.raises("NotFound", sp.run, {"true"}, {cwd = "/nonexistent-dir"})
    assert.truthy(e.message:find("/nonexistent-dir", 1, true))
    H.raises("NotFound", sp.call, "luamp-no-such-program", {shell = false})
  end)

  it("raises Value for a file that cannot be executed", function()
    local path = tmpfile("not a program")
    H.raises("Value", sp.run, {path})
    os.remove(path)
  end)

  it("raises Value for bad arguments and options", function()
    local bad = {
      function() sp.run({}) end,
      function() sp.run(nil) end,
      function() sp.run({"echo", {}}) end,
      function() sp.run({"echo", "a\0b"}) end,
      function() sp.run({"echo"}, {bogus = 1}) end,
      function() sp.run({"echo"}, {stdout = "bogus"}) end,
      function() sp.run({"echo"}, {stdout = {}}) end,
      function() sp.run({"echo"}, {stdin = "stdout"}) end,
      function() sp.run({"echo"}, {stdout = -1}) end,
      function() sp.run({"echo"}, {capture_output = true, stdout = "pipe"}) end,
      function() sp.run({"cat"}, {input = "x", stdin = "devnull"}) end,
      function() sp.run({"cat"}, {input = 5}) end,
      function() sp.run({"echo"}, {timeout = "soon"}) end,
      function() sp.run({"echo"}, {cwd = 5}) end,
      function() sp.run({"echo"}, {env = {A = {}}}) end,
      function() sp.run({"echo"}, {env = {["A=B"] = "x"}}) end,
      function() sp.run({"echo"}, {env = "A=1"}) end,
      function() sp.call({"echo"}, {capture_output = true}) end,
      function() sp.check_output({"echo"}, {stdout = "pipe"}) end,
      function()
        local f = assert(io.open("/dev/null", "w"))
        f:close()
        sp.run({"echo"}, {stdout = f})
      end,
    }
    for i, fn in ipairs(bad) do
      local ok, e = pcall(fn)
      assert.is_false(ok, "case " .. i .. " succeeded")
      assert.equal("Value", type(e) == "table" and e.kind, "case " .. i .. ": " .. tostring(e))
    end
  end)
end)

describe("subprocess.call, check_call, check_output", function()
  it("call returns the returncode", function()
    assert.equal(0, sp.call({"true"}))
    assert.equal(4, sp.call("exit 4", {shell = true}))
  end)

  it("check_call returns 0 or raises CalledProcess", function()
    assert.equal(0, sp.check_call({"true"}))
    local e = H.raises("CalledProcess", sp.check_call, {"sh", "-c", "exit 2"})
    assert.equal(2, e.returncode)
  end)

  it("check_output returns stdout or raises CalledProcess carrying it", function()
    assert.equal("hi\n", sp.check_output({"echo", "hi"}))
    assert.equal("up\n", sp.check_output({"tr", "a-z", "A-Z"}, {input = "up\n"}):lower())
    local e = H.raises("CalledProcess", sp.check_output, {"sh", "-c", "echo partial; exit 1"})
    assert.equal(1, e.returncode)
    assert.equal("partial\n", e.stdout)
    assert.equal("partial\n", e.output)
  end)

  it("call and check_output honour timeouts", function()
    H.raises("Timeout", sp.call, {"sleep", "10"}, {timeout = 0.2})
    H.raises("Timeout", sp.check_output, {"sleep", "10"}, {timeout = 0.2})
  end)
end)

describe("subprocess.Popen", function()
  it("has pid, args, returncode and a readable tostring", function()
    local p = sp.Popen({"sh", "-c", "read x"}, {stdin = "pipe"})
    assert.is_true(math.type(p.pid) == "integer" and p.pid > 0)
    assert.same({"sh", "-c", "read x"}, p.args)
    assert.is_nil(p.returncode)
    assert.is_nil(p:poll())
    assert.equal(string.format('<Popen pid=%d args="sh -c \\"read x\\"" running>', p.pid), tostring(p))
    p.stdin:write("line\n")
    p.stdin:close()
    assert.equal(0, p:wait())
    assert.equal(0, p:poll())
    assert.equal(0, p.returncode)
    assert.truthy(tostring(p):find("returncode=0", 1, true))
  end)

  it("reads a line back from a running cat", function()
    local p = sp.Popen({"cat"}, {stdin = "pipe", stdout = "pipe"})
    p.stdin:write("x\n"):flush()
    assert.equal("x", p.stdout:read("l"))
    p.stdin:write("y", "\n", 42, "\n"):flush()
    assert.equal("y\n", p.stdout:read("L"))
    assert.equal("42", p.stdout:read("l"))
    assert.is_nil(p:poll())
    p.stdin:close()
    assert.is_nil(p.stdout:read("l"))
    assert.equal(0, p:wait())
  end)

  it("reads with every file format, and lines()", function()
    local p = sp.Popen({"printf", "one\\ntwo\\nthree"}, {stdout = "pipe"})
    assert.equal("one\n", p.stdout:read("L"))
    assert.equal("two", p.stdout:read("*l"))
    assert.equal("", p.stdout:read(0))
    assert.equal("th", p.stdout:read(2))
    assert.equal("ree", p.stdout:read("a"))
    assert.equal("", p.stdout:read("a"))
    assert.is_nil(p.stdout:read("l"))
    assert.is_nil(p.stdout:read(0))
    assert.is_nil(p.stdout:read(5))
    p:wait()

    p = sp.Popen({"true"}, {stdout = "pipe"})
    assert.equal("", p.stdout:read("a"))   -- nothing ever arrived
    assert.is_nil(p.stdout:read("L"))
    p:wait()

    p = sp.Popen({"printf", "a\\nb\\nc\\nd"}, {stdout = "pipe"})
    local a, b = p.stdout:read("l", "l")
    assert.equal("a", a)
    assert.equal("b", b)
    local rest = {}
    for l in p.stdout:lines() do rest[#rest + 1] = l end
    assert.same({"c", "d"}, rest)
    p:wait()
  end)

  it("writes more than a pipe holds to a cat nobody reads yet, then reads it all", function()
    local data = all_bytes:rep(5 * 4096)
    local p = sp.Popen({"cat"}, {stdin = "pipe", stdout = "pipe"})
    p.stdin:write(data)
    p.stdin:close()
    local out = p.stdout:read("a")
    assert.equal(#data, #out)
    assert.is_true(out == data)
    assert.equal(0, p:wait())
  end)

  it("communicate sends input and returns both outputs", function()
    local p = sp.Popen({"sh", "-c", "cat; echo done >&2"}, {stdin = "pipe", stdout = "pipe", stderr = "pipe"})
    local out, err = p:communicate("hello")
    assert.equal("hello", out)
    assert.equal("done\n", err)
    assert.equal(0, p.returncode)
    -- only pipes give output
    p = sp.Popen({"true"})
    out, err = p:communicate()
    assert.is_nil(out)
    assert.is_nil(err)
  end)

  it("communicate after a timeout resumes and loses no output", function()
    local flag = os.tmpname()
    os.remove(flag)
    local p = sp.Popen({"sh", "-c", 'echo first; while [ ! -e "$1" ]; do sleep 0.01; done; echo second', "sh", flag},
      {stdout = "pipe", stderr = "pipe"})
    local e = H.raises("Timeout", p.communicate, p, nil, 0.2)
    assert.equal(0.2, e.timeout)
    assert.is_nil(p.returncode)
    io.open(flag, "w"):close()
    local out, err = p:communicate()
    assert.equal("first\nsecond\n", out)
    assert.equal("", err)
    assert.equal(0, p.returncode)
    os.remove(flag)
  end)

  it("communicate refuses input once communication started, or without a stdin pipe", function()
    local p = sp.Popen({"sleep", "10"}, {stdin = "pipe"})
    H.raises("Timeout", p.communicate, p, "x", 0.05)
    H.raises("Value", p.communicate, p, "more")
    p:kill()
    p:communicate()
    local q = sp.Popen({"true"})
    H.raises("Value", q.communicate, q, "input")
    q:wait()
  end)

  it("wait with a timeout raises Timeout; kill makes returncode negative", function()
    local p = sp.Popen({"sleep", "10"})
    local t0 = luamp.time()
    local e = H.raises("Timeout", p.wait, p, 0.2)
    assert.equal(0.2, e.timeout)
    assert.is_true(luamp.time() - t0 >= 0.19)
    p:kill()
    assert.equal(-9, p:wait())
    assert.equal(-9, p.returncode)
    p:kill()   -- after the end: nothing happens
  end)

  it("terminate and send_signal", function()
    local p = sp.Popen({"sleep", "10"})
    p:terminate()
    assert.equal(-15, p:wait())
    p = sp.Popen({"sleep", "10"})
    p:send_signal("SIGINT")
    assert.equal(-2, p:wait())
    p = sp.Popen({"sleep", "10"})
    p:send_signal(sp.signals.SIGKILL)
    assert.equal(-9, p:wait())
    H.raises("Value", p.send_signal, p, "SIGNOPE")
  end)

  it("<close> closes the streams and waits for the child", function()
    local saved
    do
      local p <close> = sp.Popen({"sh", "-c", "cat >/dev/null; exit 7"}, {stdin = "pipe", stdout = "pipe"})
      saved = p
      p.stdin:write("data")
    end
    assert.equal(7, saved.returncode)
    assert.is_true(saved.stdin.closed)
    assert.is_true(saved.stdout.closed)
    H.raises("Value", saved.communicate, saved)
    assert.equal(7, saved:wait())
  end)

  it("streams are one-way, and unusable once closed", function()
    local p = sp.Popen({"cat"}, {stdin = "pipe", stdout = "pipe"})
    assert.equal("<PopenStream stdin open>", tostring(p.stdin))
    H.raises("Value", p.stdin.read, p.stdin)
    H.raises("Value", p.stdout.write, p.stdout, "x")
    H.raises("Value", p.stdout.read, p.stdout, "n")
    H.raises("Value", p.stdin.write, p.stdin, {})
    assert.is_nil(p.stderr)
    p.stdin:close()
    p.stdin:close()
    assert.equal("<PopenStream stdin closed>", tostring(p.stdin))
    H.raises("Value", p.stdin.write, p.stdin, "x")
    assert.equal(0, p:wait())
    p.stdout:close()
    H.raises("Value", p.stdout.read, p.stdout)
  end)

  it("writing to a child that is gone raises BrokenPipe and does not kill us", function()
    local p = sp.Popen({"true"}, {stdin = "pipe"})
    p:wait()
    H.raises("BrokenPipe", function() p.stdin:write(all_bytes:rep(1024)):flush() end)
    p.stdin:close()
  end)

  it("leaves no zombie: after wait, after kill, and after being dropped", function()
    local p = sp.Popen({"true"})
    local pid = p.pid
    p:wait()
    assert.is_nil(proc_state(pid))

    p = sp.Popen({"sleep", "10"}, {stdout = "pipe"})
    pid = p.pid
    p:kill()
    p:wait()
    assert.is_nil(proc_state(pid))

    p = sp.Popen({"sh", "-c", "exit 0"})
    pid = p.pid
    p = nil
    collectgarbage()
    collectgarbage()
    -- the dropped child is reaped the next time the loop runs after it ends
    local deadline = luamp.time() + 5
    while proc_state(pid) and luamp.time() < deadline do sp.run({"true"}) end
    assert.is_nil(proc_state(pid))
  end)
end)

describe("subprocess resources", function()
  local open_fds = H.fd_count

  it("leaves no file descriptor behind, on success or failure", function()
    sp.run({"true"})   -- the loop's own descriptors exist from here on
    local before = open_fds()
    for _ = 1, 5 do
      sp.run({"cat"}, {input = "x", capture_output = true})
      pcall(sp.run, {"luamp-no-such-program"}, {capture_output = true, input = "x"})
      pcall(sp.run, {"sleep", "10"}, {capture_output = true, timeout = 0})
      local p = sp.Popen({"cat"}, {stdin = "pipe", stdout = "pipe", stderr = "pipe"})
      p:kill()
      p:wait()
      p = nil
      collectgarbage()
    end
    assert.equal(before, open_fds())
  end)

  it("times out cleanly with megabytes of input still queued", function()
    local e = H.raises("Timeout", sp.run, {"sleep", "10"}, {input = all_bytes:rep(8192), timeout = 0.2})
    assert.is_nil(e.stdout)   -- stdout was not captured
  end)

  it("runs many children at once", function()
    local ps = {}
    for i = 1, 40 do
      ps[i] = sp.Popen({"sh", "-c", "read x; echo $x-" .. i}, {stdin = "pipe", stdout = "pipe"})
    end
    for i = 40, 1, -1 do
      local out = ps[i]:communicate("go\n")
      assert.equal("go-" .. i .. "\n", out)
      assert.equal(0, ps[i].returncode)
    end
  end)
end)

describe("subprocess and Ctrl-C", function()
  it("interrupts run in the host, killing what a shell started", function()
    local pidfile = os.tmpname()
    local script = H.script([=[
      local luamp = require "luamp"
      local sp = luamp.subprocess
      local pidfile = arg[1]
      -- a Ctrl-C from outside, once the shell below has started its grandchild
      sp.Popen({"sh", "-c", 'while [ ! -s "$0" ]; do sleep 0.01; done; kill -INT $1',
        pidfile, luamp.getpid()})
      local t0 = luamp.time()
      local ok, e = pcall(sp.run, {'sleep 30 & echo $! > "$0"; wait', pidfile}, {shell = true})
      local f = assert(io.open(pidfile))
      local grandchild = f:read("n")
      f:close()
      local gone = false
      for _ = 1, 500 do
        local st = io.open("/proc/" .. grandchild .. "/stat")
        local state = st and st:read("a"):match("^%d+ %(.*%) (%a)")
        if st then st:close() end
        if state == nil or state == "Z" then gone = true break end
        luamp.sleep(0.01)
      end
      print(type(e) == "table" and e.kind or tostring(e), luamp.time() - t0 < 10, gone)
    ]=])
    local out, err, code = H.run({script, pidfile})
    os.remove(script)
    os.remove(pidfile)
    assert.equal(0, code, err)
    assert.equal("Interrupted\ttrue\ttrue\n", out)
  end)
end)

describe("subprocess with luamp processes", function()
  it("Process reaping and subprocess reaping never take each other's children", function()
    -- a Process ends while a subprocess is being waited for
    local p = sp.Popen({"sh", "-c", "read x; exit 5"}, {stdin = "pipe"})
    local proc = luamp.Process{target = function() os.exit(3) end}
    proc:start()
    H.raises("Timeout", p.wait, p, 0.3)
    proc:join()
    assert.equal(3, proc.exitcode)
    p.stdin:write("go\n")
    p.stdin:close()
    assert.equal(5, p:wait())

    -- a subprocess ends while a Process is being joined
    local q = sp.Popen({"sh", "-c", "exit 7"})
    local proc2 = luamp.Process{target = function() luamp.sleep(0.3); os.exit(6) end}
    proc2:start()
    proc2:join()
    assert.equal(6, proc2.exitcode)
    assert.equal(7, q:wait())
  end)

  it("a forked child can run subprocesses, and dropping an inherited Popen there spares the parent's child", function()
    sp.run({"true"})   -- the loop is in use before the fork
    local p = sp.Popen({"cat"}, {stdin = "pipe", stdout = "pipe"})
    local weak = setmetatable({p}, {__mode = "v"})
    local proc = luamp.Process{target = function()
      H.raises("Value", p.wait, p, 0)
      p = nil
      collectgarbage()
      collectgarbage()
      if weak[1] ~= nil then os.exit(2) end
      os.exit(sp.run({"sh", "-c", "exit 4"}).returncode)
    end}
    proc:start()
    proc:join()
    assert.equal(4, proc.exitcode)
    assert.is_nil(p:poll())
    p.stdin:write("still here\n"):flush()
    assert.equal("still here", p.stdout:read("l"))
    p.stdin:close()
    assert.equal(0, p:wait())
  end)
end)
