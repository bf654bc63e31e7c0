-- Per-task timeouts, cancel and as_completed on the Pool (issue 13).
local H = require "helper"
local luamp = H.luamp

local function kind_of(f, ...)
  local ok, e = pcall(f, ...)
  assert(not ok, "expected an error")
  return type(e) == "table" and e.kind or tostring(e), e
end

-- This process's children, zombies included (a killed worker nobody reaped counts), and
-- the shell that looks.
local function children()
  local me = tostring(luamp.getpid())
  local p = io.popen("cat /proc/[0-9]*/stat 2>/dev/null")
  local n = 0
  for line in p:lines() do
    -- pid (comm) state ppid ...: comm may hold spaces and parentheses
    local ppid = line:match("%) %a (%d+) ")
    if ppid == me then n = n + 1 end
  end
  p:close()
  return n
end

local range = H.range

-- A 1,000-item map in which item 500 hangs; every run of a task counts itself in
-- `runs` (so "every other task completed" is seen, not inferred). Only the task for x
-- writes runs[x], and never two at once (the tasks of a chunk run again only after their
-- worker was killed), so it takes no lock: a lock the two workers took 1,000 times made
-- a loaded machine's preemption of its holder count against its waiter's task as well,
-- and a waiter that sat out 0.3 s (seen under ASan: up to 0.31 s in the lock) was timed
-- out and killed, its Timeout hidden behind task 500's ("task 769 did not run").
local function hung_map(how, call)
  local pool <close> = luamp.Pool(2)
  local runs = luamp.Array("i", 1000)
  local function task(x)
    if x == 500 then
      if how == "loop" then while true do end else luamp.sleep(1e9) end
    end
    runs[x] = runs[x] + 1
    return x * 2
  end
  local t0 = luamp.time()
  local k, e = kind_of(call, pool, task, range(1000))
  local took = luamp.time() - t0
  assert.equal("Timeout", k)
  assert.truthy(tostring(e):find("task 500 ", 1, true), tostring(e))
  for i = 1, 1000 do
    if i ~= 500 then assert(runs[i] >= 1, "task " .. i .. " did not run") end
  end
  assert.equal(0, runs[500])
  assert(took < 5, "took " .. took .. " s")
  -- the pool goes on working with a replaced worker
  assert.same({2, 4, 6, n = 3}, pool:map(function(x) return x * 2 end, {1, 2, 3}))
  return pool
end

describe("Pool task timeouts", function()
  it("a hung task (infinite Lua loop) in a 1,000-item map: only it raises Timeout", function()
    hung_map("loop", function(pool, f, xs) return pool:map(f, xs, {timeout = 0.3}) end)
  end)

  it("a hung task (blocked luamp.sleep) in a 1,000-item map: only it raises Timeout", function()
    hung_map("sleep", function(pool, f, xs) return pool:map(f, xs, {timeout = 0.3}) end)
  end)

  it("the same through map_async, starmap and a chunksize of 7", function()
    hung_map("loop", function(pool, f, xs)
      return pool:map_async(f, xs, {timeout = 0.3}):get()
    end)
    hung_map("sleep", function(pool, f, xs)
      local args = {}
      for i, x in ipairs(xs) do args[i] = {x} end
      return pool:starmap(f, args, {timeout = 0.3, chunksize = 7})
    end)
  end)

  it("a timed-out chunk holding luamp objects is split and sent again with them", function()
    local pool <close> = luamp.Pool(2)
    local q = luamp.Queue()
    local items = {}
    for i = 1, 12 do items[i] = {i, q} end
    local k, e = kind_of(pool.starmap, pool, function(i, qq)
      if i == 6 then luamp.sleep(1e9) end
      qq:put(i)
      return i
    end, items, {timeout = 0.3, chunksize = 4})
    assert.equal("Timeout", k, tostring(e))
    local seen, left = {}, 11
    while left > 0 do
      local v = q:get(true, 5)
      if not seen[v] then seen[v] = true; left = left - 1 end
    end
    assert.is_nil(seen[6])
  end)

  it("imap raises Timeout at the hung task's place and goes on", function()
    for _, ordered in ipairs {true, false} do
      local pool <close> = luamp.Pool(2)
      local function task(x)
        if x == 50 then while true do end end
        return x
      end
      local method = ordered and pool.imap or pool.imap_unordered
      local it = method(pool, task, range(100), {chunksize = 4, timeout = 0.2})
      local got, timeouts, last = {}, 0, 0
      while true do
        local ok, v = pcall(it.next, it)
        if not ok then
          assert.equal("Timeout", v.kind)
          timeouts = timeouts + 1
          if ordered then assert.equal(49, last) end
        elseif v == nil then
          break
        else
          assert.is_nil(got[v], "duplicate " .. v)
          got[v] = true
          if ordered then assert.equal(last + 1 + (last == 49 and 1 or 0), v) end
          last = v
        end
      end
      assert.equal(1, timeouts)
      for i = 1, 100 do assert.equal(i ~= 50, got[i] == true, "item " .. i) end
    end
  end)

  it("apply_async: the task raises Timeout, its worker is replaced, the others finish", function()
    local base = children()
    local pool <close> = luamp.Pool(2)
    local hung = pool:apply_async(function() while true do end end, {}, {timeout = 0.2})
    local fine = {}
    for i = 1, 10 do fine[i] = pool:apply_async(function(x) return x + 1 end, {i}, {timeout = 5}) end
    assert.equal("Timeout", (kind_of(hung.get, hung)))
    for i = 1, 10 do assert.equal(i + 1, fine[i]:get()) end
    -- join returns once every worker, the killed one too, is reaped
    pool:close()
    pool:join()
    assert.equal(base, children())
  end)

  it("what a timed-out task started ends with its worker", function()
    local core = luamp._core
    local pool <close> = luamp.Pool(1)
    local pid = luamp.Value("q", 0)
    local r = pool:apply_async(function()
      local popen = luamp.subprocess.Popen({"sleep", "1000"})
      keep = popen   -- a global of the worker: nothing collects it
      pid.value = popen.pid
      luamp.sleep(1e9)
    end, {}, {timeout = 0.3})
    assert.equal("Timeout", (kind_of(r.get, r)))
    assert(pid.value > 0)
    pool:close()
    pool:join()   -- reaps the killed worker, and its process group goes with it
    local fd = core.pidfd_open(pid.value)   -- nil: already gone
    if fd then
      local ended = #core.wait_fds({fd}, 5) == 1
      core.close_fd(fd)
      if not ended then os.execute("kill -9 " .. pid.value) end
      assert.is_true(ended, "the task's subprocess outlived its worker")
    end
  end)

  it("counts running time, not time in the queue", function()
    -- one worker, five tasks of 0.2 s with a limit of 0.5 s: the last waits 0.8 s
    local pool <close> = luamp.Pool(1)
    local rs = {}
    for i = 1, 5 do rs[i] = pool:apply_async(function(x) luamp.sleep(0.2); return x end, {i}, {timeout = 0.5}) end
    for i = 1, 5 do assert.equal(i, rs[i]:get()) end
  end)

  it("100 timed-out tasks while others stream: nothing lost or duplicated, no worker leaked", function()
    -- The streamed tasks have no limit (a wall-clock limit short enough to keep this
    -- fast could be hit by a task merely descheduled on a loaded machine); they are
    -- queued behind the hung tasks on the workers that get killed, and must be sent
    -- again, each exactly once.
    local base = children()
    local pool <close> = luamp.Pool(2)
    local got, timeouts, hung = {}, 0, {}
    local it = pool:imap_unordered(function(x) return x end, range(2000), {chunksize = 4})
    local n = 0
    while true do
      local v = it:next()
      if v == nil then break end
      assert.is_nil(got[v], "duplicate " .. v)
      got[v] = true
      n = n + 1
      if n % 20 == 0 then
        hung[#hung + 1] = pool:apply_async(luamp.sleep, {1e9}, {timeout = 0.03})
      end
    end
    for _, r in ipairs(hung) do
      local k, e = kind_of(r.get, r)
      assert.equal("Timeout", k, tostring(e))
      timeouts = timeouts + 1
    end
    assert.equal(100, timeouts)
    for i = 1, 2000 do assert.is_true(got[i], "item " .. i) end
    -- join returns once every worker, the killed ones too, is reaped
    pool:close()
    pool:join()
    assert.equal(base, children())
  end)

  it("bad timeouts raise Value", function()
    local pool <close> = luamp.Pool(1)
    local id = function(x) return x end
    for _, t in ipairs {0, -1, "1", 0 / 0, true} do
      assert.equal("Value", (kind_of(pool.apply_async, pool, id, {1}, {timeout = t})))
      assert.equal("Value", (kind_of(pool.map, pool, id, {1}, {timeout = t})))
      assert.equal("Value", (kind_of(pool.map_async, pool, id, {1}, {timeout = t})))
      assert.equal("Value", (kind_of(pool.starmap, pool, id, {{1}}, {timeout = t})))
      assert.equal("Value", (kind_of(pool.imap, pool, id, {1}, {timeout = t})))
      assert.equal("Value", (kind_of(pool.imap_unordered, pool, id, {1}, {timeout = t})))
    end
    assert.same({1, n = 1}, pool:map(id, {1}, {timeout = 10}))
  end)
end)

describe("AsyncResult:cancel", function()
  it("drops a task not yet started; a started or finished one is not cancelled", function()
    local pool <close> = luamp.Pool(1)
    local go = luamp.Event()
    local ran = luamp.Value("i", 0)
    local called = false
    local running = pool:apply_async(function() go:wait(); return "first" end)
    local queued = pool:apply_async(function() ran:add(1); return "second" end, {},
      {callback = function() called = true end, error_callback = function() called = true end})
    local mapped = pool:map_async(function(x) ran:add(1); return x end, {1, 2, 3})
    assert.is_true(queued:cancel())
    assert.is_true(mapped:cancel())
    assert.is_false(queued:cancel())          -- once is enough
    assert.is_false(running:cancel())         -- handed to the worker: started
    assert.is_true(queued:ready())
    assert.equal("Closed", (kind_of(queued.get, queued)))
    assert.equal("Closed", (kind_of(mapped.get, mapped)))
    go:set()
    assert.equal("first", running:get())
    assert.is_false(running:cancel())         -- finished
    assert.equal(5, pool:apply(function(x) return x end, {5}))
    assert.equal(0, ran.value)
    assert.is_false(called)
  end)

  it("returns false for a result of a terminated pool", function()
    local pool = luamp.Pool(1)
    local go = luamp.Event()
    pool:apply_async(function() go:wait() end)
    local queued = pool:apply_async(function() end)
    pool:terminate()
    assert.is_false(queued:cancel())
    assert.equal("Closed", (kind_of(queued.get, queued)))
  end)
end)

describe("luamp.as_completed", function()
  -- Task i waits for event i: the parent decides the finishing order.
  local function gated(pools, n)
    local evs, rs = {}, {}
    for i = 1, n do
      local ev = luamp.Event()
      evs[i] = ev
      local pool = pools[(i - 1) % #pools + 1]
      rs[i] = pool:apply_async(function(x) ev:wait(); return x end, {i})
    end
    return evs, rs
  end

  it("yields each result as it becomes ready, in finishing order", function()
    local pool <close> = luamp.Pool(3)
    local evs, rs = gated({pool}, 3)
    local order = {}
    local it = luamp.as_completed(rs)
    for _, i in ipairs {2, 3, 1} do
      evs[i]:set()
      local r = it()
      order[#order + 1] = r:get()
    end
    assert.same({2, 3, 1}, order)
    assert.is_nil(it())
  end)

  it("mixes results from two pools", function()
    local a <close> = luamp.Pool(2)
    local b <close> = luamp.Pool(2)
    local evs, rs = gated({a, b}, 4)
    local order = {}
    local it = luamp.as_completed(rs)
    for _, i in ipairs {4, 1, 2, 3} do
      evs[i]:set()
      order[#order + 1] = it():get()
    end
    assert.same({4, 1, 2, 3}, order)
    assert.is_nil(it())
  end)

  it("yields results ready already, then raises Timeout when the time runs out", function()
    local pool <close> = luamp.Pool(2)
    local evs, rs = gated({pool}, 2)
    evs[1]:set()
    rs[1]:wait()
    local it = luamp.as_completed({rs[2], rs[1], rs[1]}, 0.2)
    assert.equal(rs[1], it())
    local t0 = luamp.time()
    local k, e = kind_of(it)
    assert.equal("Timeout", k)
    assert.truthy(tostring(e):find("1 of 2", 1, true), tostring(e))
    assert(luamp.time() - t0 < 1)
    evs[2]:set()
  end)

  it("a task's timeout fires inside as_completed, across pools", function()
    local a <close> = luamp.Pool(1)
    local b <close> = luamp.Pool(1)
    local hung = a:apply_async(function() while true do end end, {}, {timeout = 0.2})
    local go = luamp.Event()
    local other = b:apply_async(function() go:wait(); return 1 end)
    local it = luamp.as_completed({other, hung})
    local r = it()
    assert.equal(hung, r)
    assert.equal("Timeout", (kind_of(r.get, r)))
    go:set()
    assert.equal(other, it())
  end)

  it("rejects what is not a list of AsyncResults", function()
    assert.equal("Value", (kind_of(luamp.as_completed, 1)))
    assert.equal("Value", (kind_of(luamp.as_completed, {1})))
  end)
end)

describe("pool_time_limit example", function()
  it("the job over its limit is stopped, the others finish", function()
    assert.same({"job 1: finished", "job 2: took longer than 0.25 s, stopped", "job 3: finished",
      "all jobs done"}, H.lines(H.example("pool_time_limit.lua", "0.05")))
  end)
end)

describe("Ctrl-C and task timeouts", function()
  -- A map whose tasks keep timing out (kills, write-offs and replacements all the time)
  -- gets a Ctrl-C 0-300 ms after it starts: it ends with Interrupted (exit 130), never
  -- with a result or a Timeout, in each of 8 runs (4 at a time, each in its own session).
  local script_src = [[
    local luamp = require "luamp"
    local p <close> = luamp.Pool(2)
    local xs = {}
    for i = 1, 400 do xs[i] = i end
    print("ready"); io.stdout:flush()
    local r = p:map(function(x) if x % 3 == 0 then luamp.sleep(1e9) end return x end, xs,
      {timeout = 0.02, chunksize = 2})
    print("completed", #r)
  ]]

  it("always ends a map with timing-out tasks with Interrupted (exit 130)", function()
    local script = H.script(script_src)
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir " .. H.q(dir)))
    local reps, batch = 8, 4
    local cmd = string.format([[
      cd %s
      one() {
        setsid env --default-signal=INT %s %s > out$1 2> err$1 &
        pid=$!
        for j in $(seq 1 1000); do grep -q ready out$1 && break; sleep 0.01; done
        sleep 0.$(printf %%03d $((RANDOM %% 300)))
        kill -INT -$pid 2>/dev/null || echo "the map ended before the Ctrl-C was sent" > late$1
        for j in $(seq 1 200); do kill -0 $pid 2>/dev/null || break; sleep 0.05; done
        kill -KILL -$pid 2>/dev/null
        wait $pid
        echo "run $1 status $?" > rc$1
      }
      for b in $(seq 0 %d); do
        for k in $(seq 1 %d); do one $((b * %d + k)) & done
        wait
      done
      cat rc*
    ]], H.q(dir), H.q(H.host), H.q(script), reps // batch - 1, batch, batch)
    local summary = H.sh(cmd)
    local failures, runs = {}, 0
    for i, code in summary:gmatch("run (%d+) status (%d+)") do
      runs = runs + 1
      local f = io.open(dir .. "/out" .. i); local out = f:read("a"); f:close()
      f = io.open(dir .. "/err" .. i); local err = f:read("a"); f:close()
      local why
      local late = io.open(dir .. "/late" .. i)
      if late then why = late:read("l"); late:close()
      elseif out:find("completed") then why = "the map completed"
      elseif code == "137" then why = "still running 10 s after the Ctrl-C"
      elseif code ~= "130" or not err:find("Interrupted") then why = "exit " .. code end
      if why then failures[#failures + 1] = "run " .. i .. ": " .. why .. "\n" .. err end
    end
    os.remove(script)
    os.execute("rm -rf " .. H.q(dir))
    assert.are.equal(reps, runs, summary)
    assert.are.same({}, failures)
  end)
end)
