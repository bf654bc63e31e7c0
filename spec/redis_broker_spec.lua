-- The broker: luamp.Queue{broker=...}, luamp.Pool{broker=...} and `luamp worker`, on a
-- private redis-server (spec/redis_helper.lua) that each describe block starts and stops.
local H = require "helper"
local R = require "redis_helper"
local luamp = H.luamp
local sp = luamp.subprocess
-- Task functions travel to the workers with their _ENV upvalue: it must be the real
-- global table, not busted's sandbox.
local describe, it, setup, teardown, assert, pending = describe, it, setup, teardown, assert, pending
local _ENV = _G

local function start_worker(...) return R.start_worker(H.host, ...) end
local function until_logged(w, pattern, limit) return w.until_logged(pattern, limit) end

local describe_redis = R.available and describe or function(name) pending(name .. ": redis-server not installed") end

describe_redis("broker Queue", function()
  local s
  setup(function() s = R.start{password = "pa55word"} end)
  teardown(function() if s then s.cleanup() end; s = nil end)

  it("puts and gets values (functions too), with qsize, empty and timeouts", function()
    local q = luamp.Queue{broker = s.url, name = "q1", authkey = "k"}
    assert.is_true(q:empty())
    q:put({1, "two", {3}})
    q:put(function(x) return x + 1 end)
    assert.equal(2, q:qsize())
    assert.same({1, "two", {3}}, q:get())
    assert.equal(42, q:get(true, 1)(41))
    local t0 = luamp.time()
    local ok, e = pcall(q.get, q, true, 0.3)
    assert.is_false(ok)
    assert.equal("Empty", e.kind)
    assert.is_true(luamp.time() - t0 >= 0.25)
    ok, e = pcall(q.get_nowait, q)
    assert.equal("Empty", e.kind)
    q:close()
    ok, e = pcall(q.put, q, 1)
    assert.equal("Closed", e.kind)
  end)

  it("refuses an item signed with another authkey, and never loads it", function()
    local q = luamp.Queue{broker = s.url, name = "q2", authkey = "right"}
    local evil = luamp.Queue{broker = s.url, name = "q2", authkey = "wrong"}
    _G.broker_spec_loaded = nil
    evil:put(function() _G.broker_spec_loaded = true end)
    local ok, e = pcall(q.get, q, true, 1)
    assert.is_false(ok)
    assert.equal("Auth", e.kind)
    assert.matches("bad signature", e.message)
    assert.is_nil(_G.broker_spec_loaded)
  end)

  it("names a wrong password clearly and never shows it", function()
    local url = "redis://:hunter2@127.0.0.1:" .. s.port .. "/0"
    local ok, e = pcall(luamp.Queue, {broker = url, name = "q", authkey = "k"})
    assert.is_false(ok)
    assert.equal("Auth", e.kind)
    assert.matches("authentication failed", e.message)
    assert.matches("redis://:%*%*%*@127%.0%.0%.1:" .. s.port, e.message)
    assert.is_nil(tostring(e):find("hunter2", 1, true))
    ok, e = pcall(luamp.Queue, {broker = "redis://127.0.0.1:" .. s.port, name = "q", authkey = "k"})
    assert.equal("Auth", e.kind)
    assert.matches("wants a password", e.message)
  end)

  it("luamp worker with a wrong password exits 1 naming the server, password hidden", function()
    local _, err, code = H.run({"worker", "--broker", "redis://:hunter2@127.0.0.1:" .. s.port .. "/0",
      "--queue", "q", "--authkey", "k"})
    assert.equal(1, code)
    assert.matches("redis://:%*%*%*@127%.0%.0%.1:" .. s.port .. "/0: authentication failed", err)
    assert.is_nil(err:find("hunter2", 1, true))
  end)

  it("fails at once with the URL (password hidden) when Redis is unreachable", function()
    local dead = R.start()
    local port = dead.port
    dead.cleanup()
    local t0 = luamp.time()
    local ok, e = pcall(luamp.Queue, {broker = "redis://:secretpw@127.0.0.1:" .. port .. "/0", name = "q", authkey = "k"})
    assert.is_false(ok)
    assert.equal("BrokenPipe", e.kind)
    assert.matches("redis://:%*%*%*@127%.0%.0%.1:" .. port .. "/0: cannot connect", e.message)
    assert.is_nil(tostring(e):find("secretpw", 1, true))
    assert.is_true(luamp.time() - t0 < 5)
    ok, e = pcall(luamp.Pool, {broker = "redis://127.0.0.1:" .. port, queue = "j", authkey = "k"})
    assert.equal("BrokenPipe", e.kind)
  end)

  it("checks its options", function()
    local ok, e = pcall(luamp.Queue, {broker = s.url, name = "q"})
    assert.equal("Value", e.kind)
    assert.matches("authkey", e.message)
    ok, e = pcall(luamp.Queue, {broker = "http://x", name = "q", authkey = "k"})
    assert.equal("Value", e.kind)
    ok, e = pcall(luamp.Pool, {broker = s.url, queue = "j", authkey = "k", maxattempts = 0})
    assert.equal("Value", e.kind)
    assert.is_false(ok)
  end)
end)

describe_redis("broker Pool through two `luamp worker` processes", function()
  local s, w1, w2, pool
  setup(function()
    s = R.start()
    w1 = start_worker(s.url, "jobs", "k", 2)
    w2 = start_worker(s.url, "jobs", "k", 1, {"-v"})
    pool = luamp.Pool{broker = s.url, queue = "jobs", authkey = "k"}
  end)
  teardown(function()
    if pool then pool:terminate() end
    if w1 then w1.stop() end
    if w2 then w2.stop() end
    if s then s.cleanup() end
    s, w1, w2, pool = nil, nil, nil, nil   -- nothing of ours stays reachable from busted's context
  end)

  it("maps, starmaps, applies and iterates", function()
    assert.same({1, 4, 9, 16, 25, n = 5}, pool:map(function(x) return x * x end, {1, 2, 3, 4, 5}))
    assert.same({4, 6, n = 2}, pool:starmap(function(a, b) return a - b end, {{5, 1}, {9, 3}}))
    assert.same({7, 12}, {pool:apply(function(a, b) return a + b, a * b end, {3, 4})})
    local got = {}
    for v, i in pool:imap(function(x) return x + 1 end, {1, 2, 3, 4}, 2) do got[i] = v end
    assert.same({2, 3, 4, 5}, got)
    got = {}
    for v in pool:imap_unordered(function(x) return x * 10 end, {1, 2, 3}) do got[#got + 1] = v end
    table.sort(got)
    assert.same({10, 20, 30}, got)
    local big = {}
    for i = 1, 5000 do big[i] = i end
    local r = pool:map(function(x) return x + 1 end, big, 100)
    assert.equal(5000, #r)
    for i = 1, 5000 do assert.equal(i + 1, r[i]) end
  end)

  it("imap raises a task's error at its place and goes on; any table result passes", function()
    for _, ordered in ipairs{true, false} do
      local f = function(x)
        if x == 2 then error("two") end
        return {failed = x}
      end
      local it = ordered and pool:imap(f, {1, 2, 3}) or pool:imap_unordered(f, {1, 2, 3})
      local got, errors = {}, 0
      for _ = 1, 3 do
        local ok, v = pcall(it.next, it, 20)
        if ok then got[#got + 1] = v.failed
        else errors = errors + 1; assert.equal("Remote", v.kind); assert.matches("two", v.message) end
      end
      table.sort(got)
      assert.same({1, 3}, got)
      assert.equal(1, errors)
      assert.is_nil(it:next(20))
    end
  end)

  it("runs callbacks and error callbacks", function()
    local got, err
    local r1 = pool:map_async(function(x) return -x end, {1, 2}, {callback = function(v) got = v end})
    local r2 = pool:apply_async(function() error("no") end, {}, {error_callback = function(e) err = e end})
    r1:wait(20); r2:wait(20)
    assert.same({-1, -2, n = 2}, got)
    assert.equal("Remote", err.kind)
    assert.is_false(r2:successful())
  end)

  it("raises Remote errors with the worker's traceback", function()
    local ok, e = pcall(pool.map, pool, function(x)
      if x == 3 then error("boom at three") end
      return x
    end, {1, 2, 3, 4})
    assert.is_false(ok)
    assert.equal("Remote", e.kind)
    assert.matches("boom at three", e.message)
    assert.matches("stack traceback", e.remote_traceback)
    assert.is_nil(e.remote_traceback:find("luamp/worker.lua", 1, true))
    ok, e = pcall(pool.apply, pool, function() error({code = 7}) end)
    assert.same({code = 7}, e.remote_error)
  end)

  it("logs one line per task with -v", function()
    pool:apply(function() return 1 end)
    pool:map(function(x) return x end, {1, 2, 3, 4, 5, 6}, 1)
    until_logged(w2, "task %x+:%d+ %(entry")
  end)

  it("runs scripts/examples/cluster_map.lua", function()
    local w = start_worker(s.url, "primes", "s3cret", 2)
    local out, err, code = H.run({"scripts/examples/cluster_map.lua", s.url, "s3cret", "3000"})
    w.stop()
    assert.equal(0, code, err)
    assert.matches("primes below 3000: 430 %(100 tasks in", out)
    assert.matches("primes below 2000: 303", out)
  end)
end)

describe("luamp worker's command line", function()
  it("explains a missing option", function()
    local _, err, code = H.run({"worker", "--queue", "q"})
    assert.equal(2, code)
    assert.matches("%-%-broker is required", err)
    assert.matches("usage: luamp worker", err)
  end)

  it("exits 1 with the URL (password hidden) when Redis is unreachable", function()
    local _, err, code = H.run({"worker", "--broker", "redis://:topsecret@127.0.0.1:1/0",
      "--queue", "q", "--authkey", "k"})
    assert.equal(1, code)
    assert.matches("redis://:%*%*%*@127%.0%.0%.1:1/0: cannot connect", err)
    assert.is_nil(err:find("topsecret", 1, true))
  end)
end)
