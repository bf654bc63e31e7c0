-- The broker across "machines": Redis in one network namespace, `luamp worker`s in two
-- others, each joined to Redis's namespace by its own veth pair (addresses exist only
-- inside the namespaces). A map over 10,000 items completes with every result once while
-- one worker namespace is cut off and torn down in the middle of the run. Needs root and
-- `ip`; skipped (visibly) otherwise. Everything made is deleted after, even on failure.
local H = require "helper"
local R = require "redis_helper"
local luamp = H.luamp
local sp = luamp.subprocess

local function sh(cmd) return os.execute(cmd .. " >/dev/null 2>&1") == true end

local can = R.available and sh("[ $(id -u) = 0 ]") and sh("command -v ip") and sh("command -v redis-cli")
local describe_ns = can and describe or function(name) pending(name .. ": needs root, ip and redis-server") end

describe_ns("broker across network namespaces", function()
  local tag = tostring(luamp.getpid())
  local ns = {r = "lmp" .. tag .. "r", w1 = "lmp" .. tag .. "a", w2 = "lmp" .. tag .. "b"}
  local dir, redis, workers = nil, nil, {}

  local function in_ns(name, cmd) return "ip netns exec " .. name .. " " .. cmd end
  local function must(cmd) assert(sh(cmd), "failed: " .. cmd) end

  local function teardown_all()
    for _, w in ipairs(workers) do pcall(w.stop) end
    if redis and redis.returncode == nil then redis:kill(); redis:wait() end
    for _, n in pairs(ns) do
      sh("for p in $(ip netns pids " .. n .. "); do kill -9 $p; done")
      sh("ip netns del " .. n)
    end
    if dir then sh("rm -rf " .. dir) end
    dir, redis, workers = nil, nil, {}   -- nothing of ours stays reachable from busted's context
  end

  setup(function()
    local ok, err = pcall(function()
      for _, n in pairs(ns) do must("ip netns add " .. n); must(in_ns(n, "ip link set lo up")) end
      -- two veth pairs, made directly inside the namespaces
      must(string.format("ip link add v%sr1 netns %s type veth peer name v%sa netns %s", tag, ns.r, tag, ns.w1))
      must(string.format("ip link add v%sr2 netns %s type veth peer name v%sb netns %s", tag, ns.r, tag, ns.w2))
      must(in_ns(ns.r, "ip addr add 10.77.1.1/24 dev v" .. tag .. "r1"))
      must(in_ns(ns.r, "ip addr add 10.77.2.1/24 dev v" .. tag .. "r2"))
      must(in_ns(ns.w1, "ip addr add 10.77.1.2/24 dev v" .. tag .. "a"))
      must(in_ns(ns.w2, "ip addr add 10.77.2.2/24 dev v" .. tag .. "b"))
      for _, l in ipairs{{ns.r, "r1"}, {ns.r, "r2"}, {ns.w1, "a"}, {ns.w2, "b"}} do
        must(in_ns(l[1], "ip link set v" .. tag .. l[2] .. " up"))
      end
      dir = os.tmpname(); os.remove(dir); must("mkdir -p " .. dir)
      redis = sp.Popen({"ip", "netns", "exec", ns.r, "redis-server", "--port", "6379", "--bind", "0.0.0.0",
        "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", dir},
        {stdout = "devnull", stderr = "devnull"})
      local deadline = luamp.time() + 10
      while not sh(in_ns(ns.r, "redis-cli -h 10.77.1.1 ping")) do
        assert(luamp.time() < deadline and redis:poll() == nil, "redis-server did not start in its namespace")
        luamp.sleep(0.05)
      end
    end)
    if not ok then teardown_all(); error(err, 0) end
  end)

  teardown(teardown_all)

  it("maps 10,000 items while one worker namespace is torn down mid-run", function()
    -- The cut must find b inside a task, holding entries that a then has to claim, and a
    -- must not finish the map before b took any: a's tasks wait for the file "go"; once b
    -- has run tasks the spec makes "hold", b's next task makes "held" and never ends, and
    -- only then come "go" and the cut. (Before, on a loaded machine b could hold nothing
    -- at the cut, or start when the map was over, and a claimed nothing.)
    local gate = dir .. "/gate"
    must("mkdir " .. gate)
    local function start(n, addr, side)
      local log = os.tmpname()
      local w = {log = log}
      w.proc = sp.Popen({"ip", "netns", "exec", n, "env", "LUAMP_SPEC_SIDE=" .. side,
        "LUAMP_SPEC_GATE=" .. gate, H.host, "worker", "--broker", "redis://" .. addr .. ":6379/0",
        "--queue", "spread", "--authkey", "k", "--processes", "2", "-v"},
        {stderr = io.open(log, "w"), stdout = "devnull"})
      function w.text() return R.read_file(log) end
      function w.stop()
        if w.proc.returncode == nil then w.proc:kill(); w.proc:wait() end
      end
      workers[#workers + 1] = w
      return w
    end
    local a = start(ns.w1, "10.77.1.1", "a")
    local b = start(ns.w2, "10.77.2.1", "b")
    -- the caller runs beside Redis; it prints progress so the spec knows the map is going
    local script = H.script([[
      local luamp = require "luamp"
      local pool = luamp.Pool{broker = "redis://10.77.1.1:6379/0", queue = "spread", authkey = "k", lease = 2}
      local items = {}
      for i = 1, 10000 do items[i] = i end
      local r = pool:map(function(x)
        local gate = os.getenv("LUAMP_SPEC_GATE")
        local function exists(name)
          local f = io.open(gate .. "/" .. name)
          if f then f:close() end
          return f ~= nil
        end
        if os.getenv("LUAMP_SPEC_SIDE") == "a" then
          while not exists("go") do luamp.sleep(0.005) end
        elseif exists("hold") then
          io.open(gate .. "/held", "w"):close()
          luamp.sleep(3600)            -- cut off and killed in here
        end
        luamp.sleep(0.0005)
        return x * 3
      end, items, 20)
      local bad = 0
      for i = 1, 10000 do if r[i] ~= i * 3 then bad = bad + 1 end end
      print(#r, r.n, bad)
    ]])
    local caller = sp.Popen({"ip", "netns", "exec", ns.r, H.host, script}, {stdout = "pipe", stderr = "pipe"})
    -- tear down w2's namespace once a is running tasks and b is stuck in one
    local function until_true(what, cond)
      local deadline = luamp.time() + 60       -- (a hang guard only)
      while not cond() do
        assert(luamp.time() < deadline, what .. ":\n" .. a.text() .. b.text())
        luamp.sleep(0.02)
      end
    end
    local function exists(name) return sh("test -e " .. gate .. "/" .. name) end
    until_true("workers never started", function()
      return a.text():find("task %x+:%d+") and b.text():find("task %x+:%d+")
    end)
    must("touch " .. gate .. "/hold")
    until_true("b never held a task", function() return exists("held") end)
    must("touch " .. gate .. "/go")
    must(in_ns(ns.w2, "ip link del v" .. tag .. "b"))      -- cut off (the pair goes too)
    sh("for p in $(ip netns pids " .. ns.w2 .. "); do kill -9 $p; done")
    b.proc:wait()
    sh("ip netns del " .. ns.w2)
    local out, err = caller:communicate(nil, 90)
    os.remove(script)
    assert.equal(0, caller.returncode, err)
    assert.equal("10000\t10000\t0\n", out)
    assert.matches("claimed %d+ task", a.text())
  end)
end)
