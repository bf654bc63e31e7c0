-- The broker under faults: workers killed, stopped, terminated; a process dying inside a
-- worker; forged and garbage stream entries; Redis restarted in the middle of a map.
-- Each block has its own redis-server (spec/redis_helper.lua) and `luamp worker`s.
local H = require "helper"
local R = require "redis_helper"
local luamp = H.luamp
local describe, it, setup, teardown, before_each, after_each, assert, pending =
  describe, it, setup, teardown, before_each, after_each, assert, pending
local _ENV = _G   -- task functions carry _ENV: the real globals, not busted's sandbox

local describe_redis = R.available and describe or function(name) pending(name .. ": redis-server not installed") end

local function range(n)
  local t = {n = n}
  for i = 1, n do t[i] = i end
  return t
end

local function squares(n)
  local t = {n = n}
  for i = 1, n do t[i] = i * i end
  return t
end

describe_redis("broker faults", function()
  local s, workers, pool
  local function worker(queue, nproc, extra)
    local w = R.start_worker(H.host, s.url, queue, "k", nproc, extra)
    workers[#workers + 1] = w
    return w
  end
  setup(function() s = R.start() end)
  -- nothing of ours stays reachable from busted's context (other specs send functions
  -- whose _ENV is that context through the codec)
  teardown(function() if s then s.cleanup() end; s, workers, pool = nil, nil, nil end)
  before_each(function() workers = {} end)
  after_each(function()
    if pool then pool:terminate(); pool = nil end
    for _, w in ipairs(workers) do w.signal_group("CONT"); w.stop() end
  end)

  it("a worker SIGKILLed mid-task: its tasks run elsewhere, each result once", function()
    pool = luamp.Pool{broker = s.url, queue = "kill", authkey = "k", lease = 1}
    local a = worker("kill", 2, {"-v"})
    local res = pool:map_async(function(x) luamp.sleep(0.1); return x * x end, range(40), 1)
    a.until_logged("task %x+:%d+")
    a.signal_group("KILL")
    local b = worker("kill", 2)
    assert.same(squares(40), res:get(30))
    assert.matches("claimed %d+ task", b.text())
  end)

  it("a SIGSTOPped worker: its tasks are reclaimed after the lease", function()
    pool = luamp.Pool{broker = s.url, queue = "stop", authkey = "k", lease = 1}
    local a = worker("stop", 1, {"-v"})
    local res = pool:map_async(function(x) luamp.sleep(0.3); return x + 1 end, range(4), 1)
    a.until_logged("task %x+:%d+")
    a.signal_group("STOP")
    local t0 = luamp.time()
    local b = worker("stop", 1, {"-v"})
    local r = res:get(30)
    assert.same({2, 3, 4, 5, n = 4}, r)
    assert.is_true(luamp.time() - t0 < 10)
    assert.matches("claimed %d+ task", b.text())
    -- the stopped worker comes back and finishes its copy: the caller takes no second result
    a.signal_group("CONT")
    assert.equal(0, a.stop())
    assert.same({2, 3, 4, 5, n = 4}, r)
    assert.same({10, n = 1}, pool:map(function(x) return x * 10 end, {1}))
  end)

  it("a process dying inside a live worker: re-queued at once, WorkerLost after maxattempts", function()
    pool = luamp.Pool{broker = s.url, queue = "die", authkey = "k", lease = 30, maxattempts = 2}
    local a = worker("die", 1)
    local t0 = luamp.time()
    local ok, e = pcall(pool.apply, pool, function() os.exit(9) end)
    assert.is_false(ok)
    assert.equal("WorkerLost", e.kind)
    assert.is_true(luamp.time() - t0 < 15, "waited for the lease instead of re-queueing at once")
    assert.matches("put back", a.text())
    assert.equal(7, pool:apply(function() return 7 end))
  end)

  it("SIGTERM: the worker finishes its current task and exits 0", function()
    pool = luamp.Pool{broker = s.url, queue = "term", authkey = "k"}
    local a = worker("term", 1, {"-v"})
    local res = pool:apply_async(function() luamp.sleep(0.5); return "done" end)
    a.until_logged("task %x+:%d+")
    assert.equal(0, a.stop())
    assert.equal("done", res:get(10))
    assert.matches("stopped", a.text())
  end)

  it("Ctrl-C at the terminal (SIGINT to the whole group): tasks finish, exit 0", function()
    pool = luamp.Pool{broker = s.url, queue = "int", authkey = "k"}
    local a = worker("int", 2, {"-v"})
    local r1 = pool:apply_async(function() luamp.sleep(0.5); return "one" end)
    local r2 = pool:apply_async(function() luamp.sleep(0.5); return "two" end)
    a.until_logged("task %x+:%d+", 20, 2)
    a.signal_group("INT")
    assert.equal(0, a.proc:wait(20))
    assert.equal("one", r1:get(10))
    assert.equal("two", r2:get(10))
  end)

  it("a second signal interrupts a long task, which is handed back and runs elsewhere", function()
    pool = luamp.Pool{broker = s.url, queue = "int2", authkey = "k"}
    local a = worker("int2", 1, {"-v"})
    local res = pool:apply_async(function() luamp.sleep(3); return "long" end)
    a.until_logged("task %x+:%d+")
    a.proc:send_signal("TERM")
    a.until_logged("stopping")
    a.proc:send_signal("TERM")
    assert.equal(0, a.proc:wait(20))
    assert.matches("handed back 1 task", a.text())
    worker("int2", 1)
    assert.equal("long", res:get(20))
  end)

  it("refuses a task signed with another key (logged, not acknowledged, never loaded) and skips garbage", function()
    local a = worker("forged", 1)
    pool = luamp.Pool{broker = s.url, queue = "forged", authkey = "k"}
    local marker = os.tmpname()
    os.remove(marker)
    local c = luamp._core.redis_connect("127.0.0.1", s.port, 5)
    local stream = "luamp:{forged}:tasks"
    local wrong = luamp._core.broker_key("not the key")
    local forged = luamp._core.broker_seal(wrong, {
      id = 1, caller = "abcd", q = "forged", maxattempts = 3, mode = 0, args = {marker},
      fm = luamp._core.broker_seal(wrong, function(p) io.open(p, "w"):close() end)})
    local r = c:pipeline({{"XADD", stream, "*", "m", forged, "l", 30000, "a", 0},
                          {"XADD", stream, "*", "junk", "entry"}}, 5)
    local forged_id, junk_id = r[1], r[2]
    a.until_logged("refused entry " .. forged_id:gsub("%-", "%%-") .. ".-bad signature")
    a.until_logged("skipping entry " .. junk_id:gsub("%-", "%%-") .. ": not a luamp task")
    -- the worker goes on serving honest callers
    assert.equal(3, pool:apply(function() return 3 end))
    local pend = c:pipeline({{"XPENDING", stream, "luamp", "-", "+", 10}}, 5)[1]
    local pending_ids = {}
    for _, p in ipairs(pend) do pending_ids[p[1]] = true end
    assert.is_true(pending_ids[forged_id], "the forged entry was acknowledged")
    assert.is_nil(pending_ids[junk_id])
    assert.is_nil(io.open(marker), "the forged task ran")
    c:close()
  end)

  it("Redis restarted in the middle of a map: the map completes", function()
    pool = luamp.Pool{broker = s.url, queue = "restart", authkey = "k", lease = 10}
    worker("restart", 2)
    local res = pool:map_async(function(x) luamp.sleep(0.05); return x * x end, range(60), 1)
    local it = pool:imap(function(x) return x end, {1})
    assert.equal(1, it:next(20))      -- the workers are serving
    s.restart()
    assert.same(squares(60), res:get(40))
  end)
end)
