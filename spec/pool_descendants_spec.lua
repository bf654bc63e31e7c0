-- Processes that pool tasks start (a luamp Process, a subprocess) end with the pool: on
-- terminate(), at the end of a <close> scope, on Ctrl-C and when the pool's parent is
-- killed. And they do not inherit the worker's ignored SIGINT (issue 9, item 4).
local H = require "helper"
local P = require "pty"
local luamp = H.luamp
local core = luamp._core
local describe, it, assert = describe, it, assert
local _ENV = _G

-- The task every scenario runs in a pool worker: starts a Process and a subprocess that
-- would sleep for 1000 s and prints their pids on one line, then the word "ready".
local TASK = [[
local luamp = require "luamp"
local function task()
  local r, w = luamp.Pipe(false)
  local proc = luamp.Process{target = function() w:send("up"); luamp.sleep(1000) end}
  proc:start()
  r:recv()
  local popen = luamp.subprocess.Popen({"sleep", "1000"})
  keep = {proc, popen}   -- a global of the worker: nothing collects them
  return proc.pid, popen.pid
end
local function report(pool)
  local a, b = pool:apply(task)
  local line = "pids " .. a .. " " .. b .. "\n"
  if arg[1] then   -- a file for the pids too: a terminal session's transcript is not kept
    local f = assert(io.open(arg[1], "w")); f:write(line); f:close()
  end
  io.write(line, "ready\n")
  io.stdout:flush()
end
]]

-- pids reported by a scenario's output
local function pids_of(out)
  local a, b = out:match("pids (%d+) (%d+)")
  assert(a, "no pids in: " .. out)
  return {tonumber(a), tonumber(b)}
end

-- Asserts that each pid ends within `limit` seconds (its pidfd becomes readable: it has
-- exited, reaped or not). Kills what is left so that a failure leaves nothing behind.
local function assert_all_end(pids, limit)
  local left = {}
  for _, pid in ipairs(pids) do
    local fd = core.pidfd_open(pid)   -- nil: already gone
    if fd then
      local ended = #core.wait_fds({fd}, limit) == 1
      core.close_fd(fd)
      if not ended then left[#left + 1] = pid end
    end
  end
  for _, pid in ipairs(left) do os.execute("kill -9 " .. pid .. " 2>/dev/null") end
  assert.equal(0, #left, "left behind: " .. table.concat(left, " "))
end

-- Runs the scenario script in the host; asserts that it exited 0 and that the pids it
-- reported end (checked first: what a failure leaves behind is killed). Returns its
-- stdout. Output goes to files: processes left behind would hold a pipe open for 1000 s.
local function run(body)
  local path = H.script(TASK .. body)
  local out_path, err_path = os.tmpname(), os.tmpname()
  local status = H.sh(string.format("%s %s > %s 2> %s < /dev/null; echo $?",
    H.q(H.host), H.q(path), out_path, err_path))
  local f = io.open(out_path); local out = f:read("a"); f:close()
  f = io.open(err_path); local err = f:read("a"); f:close()
  os.remove(path); os.remove(out_path); os.remove(err_path)
  assert_all_end(pids_of(out), 10)
  assert.equal("0", status:match("%d+"), err)
  return out
end

describe("Pool descendants", function()
  it("end with pool:terminate()", function()
    local out = run [[
      local p = luamp.Pool(1)
      report(p)
      p:terminate()
      print("terminated")
    ]]
    assert.truthy(out:find("terminated"), out)
  end)

  it("end when a <close> scope ends the pool", function()
    local out = run [[
      do
        local p <close> = luamp.Pool(1)
        report(p)
      end
      print("closed")
    ]]
    assert.truthy(out:find("closed"), out)
  end)

  it("end when the pool's parent is killed (SIGKILL)", function()
    local path = H.script(TASK .. [[
      local p = luamp.Pool(1)
      report(p)
      p:map(luamp.sleep, {1000})
    ]])
    local out_path = os.tmpname()
    H.sh(string.format([[
      %s %s > %s 2>/dev/null &
      pid=$!
      for i in $(seq 1 600); do grep -q ready %s && break; sleep 0.05; done
      kill -9 $pid
      wait $pid
    ]], H.q(H.host), H.q(path), out_path, out_path))
    local f = io.open(out_path); local out = f:read("a"); f:close()
    os.remove(path); os.remove(out_path)
    assert_all_end(pids_of(out), 10)
  end)

  it("end on Ctrl-C typed on the terminal", function()
    local path = H.script(TASK .. [[
      local p = luamp.Pool(1)
      report(p)
      p:map(luamp.sleep, {1000})
    ]])
    local pids_path = os.tmpname()
    -- On the terminal, a shell that ignores Ctrl-C itself runs the script (with SIGINT
    -- back to default), then looks for the pids while it still holds the terminal: were
    -- the script the terminal's session leader, its end would hang up the whole
    -- foreground group, and that would kill the processes this is about.
    local shell = [=[
      trap '' INT
      env --default-signal=INT "$1" "$2" "$3"
      echo "status $?"
      for i in $(seq 1 100); do
        left=
        for p in $(cut -d' ' -f2- "$3"); do
          [ -d /proc/$p ] && ! grep -q '^State:.*Z' /proc/$p/status 2>/dev/null && left="$left $p"
        done
        [ -z "$left" ] && break
        sleep 0.1
      done
      echo "left:${left:-none}"
    ]=]
    local steps = os.tmpname()
    local f = assert(io.open(steps, "w"))
    f:write(P.expect("ready"), "\n", P.send("\3"), "\n", P.expect("status 130"), "\n",
      P.expect("left:none"), "\n", P.exit(0), "\n")
    f:close()
    local transcript = H.sh(string.format("python3 %s %s -- sh -c %s sh %s %s %s 2>&1",
      H.q(H.root .. "/spec/pty_session.py"), H.q(steps), H.q(shell), H.q(H.host), H.q(path),
      H.q(pids_path)))
    f = io.open(pids_path); local out = f:read("a"); f:close()
    os.remove(path); os.remove(pids_path); os.remove(steps)
    assert_all_end(pids_of(out), 10)
    assert.truthy(transcript:match("PASS\n$"), transcript)
  end)

  it("end on SIGINT to the parent's process group", function()
    local path = H.script(TASK .. [[
      local p = luamp.Pool(1)
      report(p)
      p:map(luamp.sleep, {1000})
    ]])
    local out_path = os.tmpname()
    local status = H.sh(string.format([[
      setsid env --default-signal=INT %s %s > %s 2>/dev/null &
      pid=$!
      for i in $(seq 1 600); do grep -q ready %s && break; sleep 0.05; done
      kill -INT -$pid
      wait $pid
      echo $?
    ]], H.q(H.host), H.q(path), out_path, out_path))
    local f = io.open(out_path); local out = f:read("a"); f:close()
    os.remove(path); os.remove(out_path)
    assert_all_end(pids_of(out), 10)
    assert.equal("130", status:match("%d+"))
  end)

  it("end with a worker that dies (WorkerLost)", function()
    local out = run [[
      local p = luamp.Pool(1)
      report(p)
      local ok, e = pcall(p.apply, p, function() os.execute("kill -9 " .. luamp.getpid()) end)
      print(e.kind)
      print(p:apply(function() return "replaced" end))
    ]]
    assert.truthy(out:find("WorkerLost\nreplaced"), out)
  end)

  it("end with the pool when they belong to a pool nested in a task", function()
    -- the inner workers lead groups of their own: they go through their parent-death signal
    local out = run [[
      local p = luamp.Pool(1)
      local a, b = p:apply(function()
        inner = luamp.Pool(1)   -- a global of the worker: nothing collects it
        return inner:apply(task)
      end)
      io.write("pids ", a, " ", b, "\n")
      p:terminate()
    ]]
    assert.truthy(out:find("pids"), out)
  end)

  it("do not inherit the worker's ignored SIGINT", function()
    local pool <close> = luamp.Pool(1)
    local res = pool:apply(function()
      -- SIGINT (2) is bit 1 of the SigIgn mask in /proc/PID/status
      local function ignores_int(pid)
        local f = io.open("/proc/" .. pid .. "/status")
        local mask = f:read("a"):match("SigIgn:%s*(%x+)")
        f:close()
        return tonumber(mask, 16) & 2 ~= 0
      end
      local r, w = luamp.Pipe(false)
      local proc = luamp.Process{target = function() w:send("up"); luamp.sleep(1000) end}
      proc:start()
      r:recv()
      local sleeper = luamp.subprocess.Popen({"sleep", "1000"})
      local out = {worker = ignores_int(luamp.getpid()), process = ignores_int(proc.pid)}
      sleeper:send_signal(2)
      local ok, code = pcall(sleeper.wait, sleeper, 10)
      if not ok then sleeper:kill(); sleeper:wait(); code = "still running" end
      out.subprocess = code
      proc:kill()
      proc:join()
      return out
    end)
    assert.same({worker = true, process = false, subprocess = -2}, res)
  end)
  it("workers, outside the terminal's foreground group, are not stopped by it", function()
    -- with tostop a background process writing to the terminal gets SIGTTOU, and one
    -- reading it SIGTTIN: both would stop a worker (and the pool) for good
    local path = H.script [[
      local luamp = require "luamp"
      os.execute("stty tostop")
      local p <close> = luamp.Pool(1)
      print(p:apply(function()
        io.write("worker writes\n")
        io.stdout:flush()
        return io.read("l") == nil
      end))
    ]]
    local ok, transcript = P.session({path}, {
      P.expect("worker writes"), P.expect("true"), P.exit(0)})
    os.remove(path)
    assert(ok, transcript)
  end)
end)
