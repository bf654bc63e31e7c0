-- luamp.Pool: the behaviour of issue 5 (map, apply, imap, callbacks, worker death,
-- terminate, close/join, progress, Ctrl-C).
local H = require "helper"
local luamp = H.luamp
-- Task functions travel to the workers, their _ENV upvalue with them: it must be the real
-- global table (which binds to the worker's own), not busted's sandbox.
local describe, it, setup, teardown, assert = describe, it, setup, teardown, assert
local _ENV = _G

local range = H.range

local function alive(pid)
  return os.execute("kill -0 " .. pid .. " 2>/dev/null") == true
end

describe("Pool", function()
  local pool
  setup(function() pool = luamp.Pool(2) end)
  teardown(function() pool:terminate() end)

  describe("construction", function()
    it("takes a number or an options table; tostring shows size and state", function()
      local p <close> = luamp.Pool{processes = 1}
      assert.equal("<Pool processes=1 state=RUN>", tostring(p))
      assert.equal(1, p.processes)
    end)

    it("defaults to cpu_count() workers", function()
      local p <close> = luamp.Pool()
      assert.equal(luamp.cpu_count(), p.processes)
    end)

    it("rejects bad options with Value", function()
      H.raises("Value", luamp.Pool, 0)
      H.raises("Value", luamp.Pool, {processes = 1.5})
      H.raises("Value", luamp.Pool, {processes = 1, bogus = true})
      H.raises("Value", luamp.Pool, {processes = 1, maxtasksperchild = 0})
      H.raises("Value", luamp.Pool, {processes = 1, initializer = 42})
    end)
  end)

  describe("map", function()
    it("maps squares in order, 1-based, with n (seed example)", function()
      local r = pool:map(function(x) return x * x end, range(10))
      assert.same({1, 4, 9, 16, 25, 36, 49, 64, 81, 100, n = 10}, r)
    end)

    it("keeps nil results in their place", function()
      local r = pool:map(function(x) if x % 2 == 0 then return nil end return x end, range(5))
      assert.equal(5, r.n)
      assert.same({1, nil, 3, nil, 5}, {r[1], r[2], r[3], r[4], r[5]})
    end)

    it("keeps the order at every chunksize", function()
      local items = range(37)
      for cs = 1, 38 do
        local r = pool:map(function(x) return x * 10 end, items, cs)
        assert.equal(37, r.n)
        for i = 1, 37 do assert.equal(i * 10, r[i], "chunksize " .. cs) end
      end
    end)

    it("takes items with nils when the list has n", function()
      local r = pool:map(function(x) return x == nil and "none" or x end, {n = 3, 1, nil, 3})
      assert.same({1, "none", 3, n = 3}, r)
    end)

    it("takes an iterator function", function()
      local i = 0
      local r = pool:map(function(x) return -x end, function() i = i + 1; if i <= 4 then return i end end)
      assert.same({-1, -2, -3, -4, n = 4}, r)
    end)

    it("maps 200,000 items", function()
      local r = pool:map(function(x) return x + 1 end, range(200000))
      assert.equal(200000, r.n)
      for i = 1, 200000, 997 do assert.equal(i + 1, r[i]) end
      assert.equal(200001, r[200000])
    end)

    it("returns an empty result for an empty list", function()
      assert.same({n = 0}, pool:map(function(x) return x end, {}))
    end)

    it("accepts {chunksize =} and rejects a bad one", function()
      assert.same({2, 4, n = 2}, pool:map(function(x) return 2 * x end, {1, 2}, {chunksize = 1}))
      H.raises("Value", pool.map, pool, print, {1}, 0)
      H.raises("Value", pool.map, pool, print, {1}, {bogus = 1})
      H.raises("Value", pool.map, pool, 42, {1})
    end)

    it("starmap unpacks argument lists, nils included", function()
      local r = pool:starmap(function(a, b, c) return tostring(a) .. tostring(b) .. tostring(c) end,
        {{1, 2, 3}, {n = 3, "x", nil, "z"}})
      assert.same({"123", "xnilz", n = 2}, r)
      H.raises("Value", pool.starmap, pool, print, {1, 2})
    end)

    it("sends the function once per call: its upvalues live on in the worker", function()
      local p <close> = luamp.Pool(1)
      local counter = {n = 0}
      local f = function() counter.n = counter.n + 1; return counter.n end
      local r = p:map(f, range(50), 1)
      for i = 1, 50 do assert.equal(i, r[i]) end
    end)

    it("sees upvalues changed between calls", function()
      local k = 2
      local f = function(x) return x * k end
      assert.same({2, 4, n = 2}, pool:map(f, {1, 2}))
      k = 3
      assert.same({3, 6, n = 2}, pool:map(f, {1, 2}))
    end)
  end)

  describe("apply", function()
    it("returns all of the function's results", function()
      local a, b, c = pool:apply(function(x, y) return x + y, x * y, nil end, {3, 4})
      assert.same({7, 12}, {a, b})
      assert.is_nil(c)
      assert.same(table.pack(1, nil, 3), table.pack(pool:apply(function() return 1, nil, 3 end)))
    end)

    it("apply_async(getpid) runs in a worker (seed example)", function()
      local res = pool:apply_async(luamp.getpid, {})
      local pid = res:get(5)
      assert.is_true(pid ~= luamp.getpid())
      local pids = {}
      local results = {}
      for i = 1, 4 do results[i] = pool:apply_async(luamp.getpid) end
      for i = 1, 4 do pids[results[i]:get(5)] = true end
      local n = 0
      for p in pairs(pids) do n = n + 1; assert.is_true(p ~= luamp.getpid()) end
      assert.is_true(n >= 1 and n <= 2)
    end)

    it("get(1) on a 10-second task raises Timeout after about a second", function()
      local p <close> = luamp.Pool(1)
      local res = p:apply_async(luamp.sleep, {10})
      local t0 = luamp.time()
      local err = H.raises("Timeout", res.get, res, 1)
      local dt = luamp.time() - t0
      assert.is_true(dt >= 0.9 and dt < 5, "waited " .. dt)
      assert.is_false(res:ready())
      assert.truthy(tostring(err):find("Timeout"))
    end)

    it("AsyncResult: ready, successful, wait, tostring", function()
      local res = pool:apply_async(function(x) return x end, {5})
      res:wait()
      assert.is_true(res:ready())
      assert.is_true(res:successful())
      assert.equal("<AsyncResult ready=true successful=true>", tostring(res))
      local p <close> = luamp.Pool(1)
      local slow = p:apply_async(luamp.sleep, {10})
      assert.equal("<AsyncResult ready=false>", tostring(slow))
      H.raises("Value", slow.successful, slow)
      slow:wait(0.05)
      assert.is_false(slow:ready())
    end)

    it("five tasks on four workers: the fifth starts when one finishes (seed example)", function()
      -- made before the pool, so the workers inherit them
      local report_r, report_w = luamp.Pipe(false)
      local gates = {}
      for i = 1, 4 do gates[i] = {luamp.Pipe(false)} end
      local p <close> = luamp.Pool(4)
      local results = {}
      for i = 1, 5 do
        results[i] = p:apply_async(function(n)
          report_w:send(n)
          if n <= 4 then gates[n][1]:recv() end
          return n
        end, {i})
      end
      local started = {}
      for _ = 1, 4 do started[report_r:recv()] = true end
      assert.is_nil(started[5])
      assert.is_false(report_r:poll(0.2))     -- the fifth waits for a free worker
      gates[3][2]:send("go")
      assert.equal(3, results[3]:get(5))
      assert.equal(5, report_r:recv())
      assert.equal(5, results[5]:get(5))
      for _, i in ipairs({1, 2, 4}) do gates[i][2]:send("go") end
      for _, i in ipairs({1, 2, 4}) do assert.equal(i, results[i]:get(5)) end
    end)

    it("long tasks after a warm-up of short ones are not handed out in halves up front", function()
      -- The warm-up makes the function's estimate tiny; the real tasks run 5 ms. One
      -- worker (the first, which gets the first item) is stuck on its task until the end:
      -- every task it was given up front waits behind it. Before, each worker was handed
      -- its fair share of the 16 tasks at once on the warm-up's estimate (8 each): the
      -- other worker ran its 8 and sat idle. Now a job's chunks go out one (and one
      -- waiting behind it) at a time until a result of the job itself has come back.
      local report_r, report_w = luamp.Pipe(false)
      local gate_r, gate_w = luamp.Pipe(false)
      local p <close> = luamp.Pool(2)
      local stuck = {}
      local function task(x)
        if x == 0 then return 0 end
        local me = luamp.getpid()
        report_w:send(me)
        if me == stuck[1] then gate_r:recv() else luamp.sleep(0.005) end
        return me
      end
      stuck[1] = p:pids()[1]
      p:map(task, {0, 0, 0, 0})
      local res = p:map_async(task, range(16), 1)
      local others = 0
      while others < 13 do
        assert.is_true(report_r:poll(10), "the free worker ran only " .. others .. " tasks")
        if report_r:recv() ~= stuck[1] then others = others + 1 end
      end
      for _ = 1, 16 do gate_w:send("go") end
      assert.equal(16, res:get(10).n)
    end)
  end)

  describe("errors", function()
    it("a task that raises re-raises as Remote with the worker's traceback", function()
      local err = H.raises("Remote", pool.apply, pool, function() error("boom") end)
      assert.truthy(err.message:find("boom", 1, true))
      assert.truthy(err.remote_traceback:find("pool_spec.lua:%d+"))
      assert.truthy(err.remote_error:find("boom", 1, true))
    end)

    it("keeps the original error value when it can cross", function()
      local err = H.raises("Remote", pool.apply, pool, function() error({code = 7}) end)
      assert.same({code = 7}, err.remote_error)
      local lerr = H.raises("Remote", pool.apply, pool, function() luamp._core.raise("Value", "bad") end)
      assert.equal("Value", lerr.remote_error.kind)
      assert.truthy(lerr.message:find("bad", 1, true))
    end)

    it("gives the string of an error value that cannot cross", function()
      local err = H.raises("Remote", pool.apply, pool, function() error(coroutine.create(print)) end)
      assert.truthy(tostring(err.remote_error):find("thread", 1, true))
    end)

    it("a result that cannot cross fails the task with Remote", function()
      local err = H.raises("Remote", pool.apply, pool, function() return coroutine.create(print) end)
      assert.truthy(err.message:find("coroutine", 1, true))
      assert.same({1, n = 1}, pool:map(function(x) return x end, {1}))
    end)

    it("a function that cannot cross raises Serialize at the call", function()
      local co = coroutine.create(print)
      H.raises("Serialize", pool.apply_async, pool, function() return co end)
    end)

    it("map fails as a whole with the first error", function()
      local err = H.raises("Remote", pool.map, pool, function(x)
        if x == 7 then error("seven") end
        return x
      end, range(20), 1)
      assert.truthy(err.message:find("seven", 1, true))
    end)
  end)

  describe("callbacks", function()
    it("map_async's callback runs inside another luamp wait (seed example)", function()
      local r, w = luamp.Pipe(false)
      pool:map_async(function(x) return x * 2 end, range(5), {callback = function(res)
        w:send(res)
      end})
      assert.same({2, 4, 6, 8, 10, n = 5}, r:recv())
    end)

    it("apply_async's callback gets every result; error_callback gets the error", function()
      local got, gerr
      local a = pool:apply_async(function() return 1, 2 end, {}, {callback = function(x, y) got = {x, y} end})
      local b = pool:apply_async(function() error("bad") end, {}, {error_callback = function(e) gerr = e end})
      a:wait(); b:wait()
      assert.same({1, 2}, got)
      assert.equal("Remote", gerr.kind)
      assert.is_false(b:successful())
    end)

    it("luamp.poll() runs callbacks without blocking", function()
      local done = false
      local res = pool:apply_async(function() return true end, {}, {callback = function() done = true end})
      local deadline = luamp.time() + 10
      while not done and luamp.time() < deadline do luamp.poll() end
      assert.is_true(done)
      assert.is_true(res:ready())
    end)

    it("an error in a callback is reported and does not break the pool", function()
      -- in a child process, whose stderr (the report) is checked rather than shown
      local script = H.script([[
        local luamp = require "luamp"
        local p <close> = luamp.Pool(1)
        local res = p:apply_async(function() return 1 end, {}, {callback = function() error("cb failed") end})
        res:wait()
        assert(res:get() == 1)
        local r = p:map(function(x) return x end, {1})
        assert(r.n == 1 and r[1] == 1)
        io.write("pool ok")
      ]])
      local out, err, code = H.run({script})
      os.remove(script)
      assert.equal(0, code, err)
      assert.equal("pool ok", out)
      assert.truthy(err:find("^luamp: error in a pool callback: [^\n]*: cb failed\n"), err)
    end)
  end)

  describe("imap", function()
    it("yields in order, with the input index", function()
      local vals, idx = {}, {}
      for v, i in pool:imap(function(x) return x + 42 end, range(10)) do
        vals[#vals + 1], idx[#idx + 1] = v, i
      end
      assert.same({43, 44, 45, 46, 47, 48, 49, 50, 51, 52}, vals)
      assert.same(range(10), idx)
    end)

    it("imap_unordered yields every result once", function()
      local seen = {}
      for v, i in pool:imap_unordered(function(x) return x * x end, range(30), 4) do
        assert.equal(i * i, v)
        assert.is_nil(seen[i])
        seen[i] = true
      end
      for i = 1, 30 do assert.is_true(seen[i]) end
    end)

    it("it:next([timeout]) steps through (seed example)", function()
      local it = pool:imap(function(x) return x * x end, range(10))
      assert.equal(0 + 1, it:next())
      assert.equal(4, it:next())
      assert.equal(9, it:next(5))
      local rest = 0
      while it:next(5) do rest = rest + 1 end
      assert.equal(7, rest)
      assert.is_nil(it:next())
    end)

    it("streams a generator and stays bounded on an endless one", function()
      local pulled = 0
      local function naturals()
        return function() pulled = pulled + 1; return pulled end
      end
      local n = 0
      for v in pool:imap(function(x) return x * 2 end, naturals()) do
        n = n + 1
        assert.equal(2 * n, v)
        if n == 2000 then break end
      end
      assert.is_true(pulled < 2000 + 200, "pulled " .. pulled)
      assert.same({1, n = 1}, pool:map(function(x) return x end, {1}))
    end)

    it("an error from the input iterator surfaces as-is after the items before it", function()
      local i = 0
      local function gen()
        i = i + 1
        if i == 6 then error({input = "broken"}) end
        return i
      end
      for _, unordered in ipairs({false, true}) do
        i = 0
        local got = {}
        local ok, err = pcall(function()
          local f = unordered and pool.imap_unordered or pool.imap
          for v in f(pool, function(x) return x end, gen) do got[#got + 1] = v end
        end)
        assert.is_false(ok)
        assert.same({input = "broken"}, err)
        table.sort(got)
        assert.same({1, 2, 3, 4, 5}, got)
      end
    end)

    it("results that look like anything are yielded as they are", function()
      local r = {}
      for v in pool:imap(function(x) return {err = "not an error", skip = x} end, range(3)) do
        r[#r + 1] = v.skip
      end
      assert.same({1, 2, 3}, r)
    end)

    it("a failing task raises at its place and iteration goes on", function()
      local it = pool:imap(function(x) if x == 2 then error("two") end return x end, range(3))
      assert.equal(1, it:next())
      local err = H.raises("Remote", it.next, it)
      assert.truthy(err.message:find("two", 1, true))
      assert.equal(3, it:next())
      assert.is_nil(it:next())
    end)
  end)

  describe("worker death", function()
    local function lose(p, how)
      local t0 = luamp.time()
      local err = H.raises("WorkerLost", p.apply, p, how)
      return err, luamp.time() - t0
    end

    it("os.exit, SIGKILL and a crash fail just that task, promptly; the pool goes on", function()
      local p <close> = luamp.Pool(2)
      local err, dt = lose(p, function() os.exit(3) end)
      assert.equal(3, err.exitcode)
      assert.is_true(math.type(err.pid) == "integer" and not alive(err.pid))
      assert.is_true(dt < 1, "took " .. dt)
      err = lose(p, function() os.execute("kill -9 " .. luamp.getpid()) end)
      assert.equal(-9, err.exitcode)
      assert.same({1, 4, 9, n = 3}, p:map(function(x) return x * x end, {1, 2, 3}))
      -- a crash, in a child process whose stderr is checked rather than shown: under the
      -- sanitizer the worker's SEGV handler reports the crash there and exits 1
      local script = H.script([[
        local luamp = require "luamp"
        local p <close> = luamp.Pool(2)
        local ok, err = pcall(p.apply, p, function() os.execute("kill -SEGV " .. luamp.getpid()) end)
        assert(not ok and err.kind == "WorkerLost", tostring(err))
        local r = p:map(function(x) return x * x end, {1, 2, 3})
        io.write(err.exitcode, " ", table.concat(r, ","))
      ]])
      local out, stderr, code = H.run({script})
      os.remove(script)
      assert.equal(0, code, stderr)
      if os.getenv("LUAMP_SANITIZE") == "1" then
        assert.equal("1 1,4,9", out)
        assert.truthy(stderr:find("AddressSanitizer: SEGV", 1, true), stderr)
      else
        assert.equal("-11 1,4,9", out)
        assert.equal("", stderr)
      end
    end)

    it("every other task still completes", function()
      local p <close> = luamp.Pool(2)
      local results = {}
      for i = 1, 30 do
        results[i] = p:apply_async(function(n)
          if n == 10 then os.exit(1) end
          return n
        end, {i})
      end
      for i = 1, 30 do
        if i == 10 then
          H.raises("WorkerLost", results[i].get, results[i], 10)
        else
          assert.equal(i, results[i]:get(10))
        end
      end
    end)

    it("a map whose worker dies fails with WorkerLost; the next map works", function()
      local p <close> = luamp.Pool(2)
      H.raises("WorkerLost", p.map, p, function(x) if x == 50 then os.exit(2) end return x end, range(100), 5)
      local r = p:map(function(x) return x end, range(100), 5)
      assert.equal(100, r.n)
    end)

    it("maxtasksperchild replaces workers", function()
      local p <close> = luamp.Pool{processes = 1, maxtasksperchild = 2}
      local count = {}
      local distinct = 0
      for _ = 1, 6 do
        local pid = p:apply(luamp.getpid)
        if not count[pid] then distinct = distinct + 1 end
        count[pid] = (count[pid] or 0) + 1
      end
      assert.equal(3, distinct)
      for _, c in pairs(count) do assert.equal(2, c) end
    end)
  end)

  describe("initializer", function()
    it("runs in each worker before its tasks", function()
      local p <close> = luamp.Pool{processes = 2, initializer = function(v) POOL_INIT_VALUE = v end,
                                  initargs = {"ready"}}
      local r = p:map(function() return POOL_INIT_VALUE end, range(4), 1)
      assert.same({"ready", "ready", "ready", "ready", n = 4}, r)
    end)

    it("one that raises is reported, not retried forever", function()
      local p <close> = luamp.Pool{processes = 2, initializer = function() error("no init") end}
      local err = H.raises("Remote", p.map, p, function(x) return x end, range(10))
      assert.truthy(err.message:find("initializer", 1, true))
      assert.truthy(err.message:find("no init", 1, true))
      H.raises("Remote", p.apply, p, print)
      p:close()
      p:join()
    end)
  end)

  describe("descriptors", function()
    it("a worker holds none of its siblings' descriptors (pidfds, pipes, rings)", function()
      -- each worker counts its open descriptors; workers forked one after another used
      -- to keep the pidfds of the ones forked before them (Pool(4): 0, 1, 2, 3 extra)
      local p <close> = luamp.Pool(4)
      local function count()
        luamp.sleep(0.05)   -- long enough that every worker takes some of the items
        local n = 0
        for fd = 0, 1023 do
          local f = io.open("/proc/self/fdinfo/" .. fd)
          if f then n = n + 1; f:close() end
        end
        return {luamp.getpid(), n}
      end
      local by_pid, pids = {}, 0
      for _, r in ipairs(p:map(count, range(16), 1)) do
        if not by_pid[r[1]] then pids = pids + 1 end
        by_pid[r[1]] = r[2]
      end
      assert.is_true(pids >= 2, "only " .. pids .. " worker(s) answered")
      local first
      for pid, n in pairs(by_pid) do
        first = first or n
        assert.equal(first, n, "worker " .. pid .. " holds " .. n .. " descriptors, another " .. first)
      end
    end)
  end)

  describe("close, join, terminate", function()
    it("join before close raises Value; after close no new work; join waits (seed example)", function()
      local p = luamp.Pool(2)
      H.raises("Value", p.join, p)
      local results = {}
      for i = 1, 5 do results[i] = p:apply_async(function(n) luamp.sleep(0.01); return n end, {i}) end
      p:close()
      H.raises("Value", p.apply_async, p, print)
      H.raises("Value", p.map, p, print, {1})
      p:join()
      for i = 1, 5 do
        assert.is_true(results[i]:ready())
        assert.equal(i, results[i]:get())
      end
      assert.equal("<Pool processes=2 state=CLOSE>", tostring(p))
    end)

    it("terminate with 10,000 tasks pending returns promptly; their results raise Closed", function()
      local p = luamp.Pool(2)
      local results = {}
      for i = 1, 10000 do results[i] = p:apply_async(luamp.sleep, {1}) end
      local t0 = luamp.time()
      p:terminate()
      assert.is_true(luamp.time() - t0 < 3)
      H.raises("Closed", results[10000].get, results[10000])
      H.raises("Closed", results[1].get, results[1])
      p:join()
      assert.equal("<Pool processes=2 state=TERMINATE>", tostring(p))
    end)

    it("terminate while tasks run leaves no worker behind", function()
      local r, w = luamp.Pipe(false)   -- before the pool: the workers inherit it
      local p = luamp.Pool(2)
      local pids = {}
      for _ = 1, 2 do p:apply_async(function() w:send(luamp.getpid()); luamp.sleep(30) end) end
      for i = 1, 2 do pids[i] = r:recv() end
      p:terminate()
      for i = 1, 2 do assert.is_false(alive(pids[i])) end
    end)

    it("<close> terminates", function()
      local pid
      do
        local p <close> = luamp.Pool(1)
        pid = p:apply(luamp.getpid)
      end
      assert.is_false(alive(pid))
    end)

    it("a pool belongs to the process that made it", function()
      local p <close> = luamp.Pool(1)
      local proc = luamp.Process{target = function()
        local ok, err = pcall(p.map, p, print, {1})
        os.exit((not ok and err.kind == "Value") and 0 or 1)
      end}
      proc:start()
      proc:join()
      assert.equal(0, proc.exitcode)
    end)
  end)

  describe("parent killed", function()
    it("the workers die with it", function()
      local script = H.script([[
        local luamp = require "luamp"
        local r, w = luamp.Pipe(false)
        local p = luamp.Pool(2)
        for _ = 1, 2 do p:apply_async(function() w:send(luamp.getpid()); luamp.sleep(60) end) end
        print(r:recv(), r:recv())
        io.stdout:flush()
        luamp.sleep(60)
      ]])
      local out_path = os.tmpname()
      H.sh(string.format([[
        %s %s > %s 2>/dev/null &
        pid=$!
        for i in $(seq 1 400); do [ -s %s ] && break; sleep 0.05; done
        kill -9 $pid
        wait $pid 2>/dev/null
      ]], H.q(H.host), H.q(script), out_path, out_path))
      local f = io.open(out_path); local out = f:read("a"); f:close()
      os.remove(script); os.remove(out_path)
      local n = 0
      for pid in out:gmatch("%d+") do
        n = n + 1
        local fd = luamp._core.pidfd_open(tonumber(pid))
        if fd then
          -- readable once the process has ended
          assert.equal(1, #luamp._core.wait_fds({fd}, 5), "worker " .. pid .. " outlived its parent")
          luamp._core.close_fd(fd)
        end
      end
      assert.equal(2, n)
    end)
  end)

  describe("nesting", function()
    it("a Pool works inside a child process", function()
      local proc = luamp.Process{target = function()
        local p <close> = luamp.Pool(2)
        local r = p:map(function(x) return x * 3 end, range(10))
        os.exit(r[10] == 30 and r.n == 10 and 0 or 1)
      end}
      proc:start()
      proc:join()
      assert.equal(0, proc.exitcode)
    end)

    it("a task may run a pool of its own", function()
      local r = pool:apply(function()
        local inner <close> = luamp.Pool(2)
        return inner:map(function(x) return x + 1 end, {1, 2, 3})
      end)
      assert.same({2, 3, 4, n = 3}, r)
    end)
  end)

  describe("progress", function()
    it("prints nothing when stderr is not a terminal", function()
      local script = H.script([[
        local luamp = require "luamp"
        local p <close> = luamp.Pool(2)
        local r = p:map(function(x) return x end, {1, 2, 3}, {progress = true})
        print(r.n)
      ]])
      local out, err, code = H.run({script})
      os.remove(script)
      assert.equal(0, code, err)
      assert.equal("3\n", out)
      assert.equal("", err)
    end)

    it("draws done/total, rate and ETA on a terminal", function()
      local script = H.script([[
        local luamp = require "luamp"
        local p <close> = luamp.Pool(2)
        local r = p:map(function(x) return x end, {1, 2, 3, 4}, {progress = true, chunksize = 1})
        for _ in p:imap(function(x) return x end, function() end, {progress = true}) do end
      ]])
      local out = H.sh("script -qec " .. H.q(H.q(H.host) .. " " .. H.q(script)) .. " /dev/null 2>&1")
      os.remove(script)
      assert.truthy(out:find("4/4 %(100%%%) [%d.]+/s ETA 0:00"), out)
      assert.truthy(out:find("0 done"), out)
    end)

    it("ends with the interrupted state after Ctrl-C, not an ETA", function()
      -- the second task sends the parent SIGINT (workers ignore it) while the map waits
      local script = H.script([[
        local luamp = require "luamp"
        local parent = luamp.getpid()
        local p <close> = luamp.Pool(1)
        p:map(function(x)
          if x == 2 then luamp.subprocess.run({"kill", "-INT", tostring(parent)}) luamp.sleep(30) end
          return x
        end, {1, 2, 3, 4}, {progress = true, chunksize = 1})
      ]])
      local out, code = H.sh("script -qec " .. H.q(H.q(H.host) .. " " .. H.q(script)) .. " /dev/null 2>&1")
      os.remove(script)
      -- the last drawing (the one ending the line) says what happened
      assert.truthy(out:find("1/4 %(25%%%) [%d.]+/s interrupted\27%[K\r?\n"), out)
      assert.falsy(out:find("ETA [%d:]+\27%[K\r?\n"), out)
      assert.truthy(out:find("Interrupted", 1, true), out)
    end)
  end)

  describe("Ctrl-C", function()
    it("stops the pool, raises Interrupted, exits 130 and leaves no process", function()
      local script = H.script([[
        local luamp = require "luamp"
        local r, w = luamp.Pipe(false)
        local p = luamp.Pool(2)
        for _ = 1, 2 do p:apply_async(function() w:send(luamp.getpid()); luamp.sleep(20) end) end
        for _ = 1, 2 do io.write(r:recv(), " ") end
        print("ready")
        io.stdout:flush()
        p:map(luamp.sleep, {20, 20})
      ]])
      local out_path = os.tmpname()
      local err_path = os.tmpname()
      -- its own process group, SIGINT not ignored (as a background job's would be), and
      -- the signal sent to the whole group: what Ctrl-C on a terminal does
      local cmd = string.format([[
        setsid env --default-signal=INT %s %s > %s 2> %s &
        pid=$!
        for i in $(seq 1 400); do grep -q ready %s && break; sleep 0.05; done
        kill -INT -$pid
        wait $pid
        echo $?
      ]], H.q(H.host), H.q(script), out_path, err_path, out_path)
      local status = H.sh(cmd)
      local f = io.open(out_path); local out = f:read("a"); f:close()
      f = io.open(err_path); local err = f:read("a"); f:close()
      os.remove(script); os.remove(out_path); os.remove(err_path)
      assert.equal("130", status:match("%d+"), err)
      assert.truthy(err:find("Interrupted"), err)
      local n = 0
      for pid in out:gmatch("(%d+) ") do
        n = n + 1
        assert.is_false(alive(tonumber(pid)), "worker " .. pid .. " left behind")
      end
      assert.equal(2, n)
      -- no worker printed a traceback of its own
      local _, tracebacks = err:gsub("stack traceback", "")
      assert.is_true(tracebacks <= 1, err)
    end)
  end)
end)
