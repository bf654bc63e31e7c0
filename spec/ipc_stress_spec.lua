-- Stress and crash specs for queues and pipes: many processes at once, large items, and
-- processes SIGKILLed at chosen points inside put and get (via _core._queue_stall, which
-- parks a process at that point and tells us through a pipe).
local H = require "helper"
local luamp = H.luamp
local core = luamp._core

local start = H.start

local until_waiting = H.until_waiting

local stalled, kill = H.stalled, H.kill9

describe("queue stress", function()
  it("4 producers x 4 consumers x 25,000 items: every item exactly once", function()
    local q, out = luamp.Queue(), luamp.Queue()
    local P, C, N = 4, 4, 25000
    local producers, consumers = {}, {}
    for c = 1, C do
      consumers[c] = start(function()
        local got = {}
        while true do
          local v = q:get()
          if v == false then break end
          got[#got + 1] = v
        end
        out:put(got)
      end)
    end
    for k = 1, P do
      producers[k] = start(function()
        for i = 1, N do q:put((k - 1) * N + i) end
      end)
    end
    for _, p in ipairs(producers) do p:join(); assert.equal(0, p.exitcode) end
    for _ = 1, C do q:put(false) end
    local seen, total = {}, 0
    for _ = 1, C do
      local got = out:get(true, 60)
      for _, v in ipairs(got) do
        assert(not seen[v], "item delivered twice")
        seen[v] = true
      end
      total = total + #got
    end
    for _, p in ipairs(consumers) do p:join(); assert.equal(0, p.exitcode) end
    assert.equal(P * N, total)
    for v = 1, P * N do assert(seen[v], "item lost") end
  end)

  it("20 producers that exit right after their puts lose nothing", function()
    local q = luamp.Queue()
    local ps = {}
    for k = 1, 20 do
      ps[k] = start(function()
        for i = 1, 50 do q:put({k, i}) end
      end)
    end
    for _, p in ipairs(ps) do p:join(); assert.equal(0, p.exitcode) end
    assert.equal(1000, q:qsize())
    local next_of = {}
    for _ = 1, 1000 do
      local k, i = table.unpack(q:get(false))
      assert.equal((next_of[k] or 0) + 1, i)   -- each producer's items stay in order
      next_of[k] = i
    end
    for k = 1, 20 do assert.equal(50, next_of[k]) end
  end)

  it("50 items of 1 MiB pass through a Queue(1)", function()
    local q = luamp.Queue(1)
    local p = start(function()
      for i = 1, 50 do q:put(string.rep(string.char(i), 1 << 20)) end
    end)
    for i = 1, 50 do
      local s = q:get(true, 60)
      assert(#s == 1 << 20 and s == string.rep(string.char(i), 1 << 20), "item " .. i)
    end
    p:join()
    assert.equal(0, p.exitcode)
    assert.is_true(q:empty())
  end)
end)

describe("pipe stress", function()
  it("10,000 ping-pongs", function()
    local a, b = luamp.Pipe()
    local p = start(function()
      while true do
        local n = a:recv()
        if n < 0 then break end
        a:send(n + 1)
      end
    end)
    local n = 0
    for _ = 1, 10000 do
      b:send(n)
      n = b:recv()
    end
    b:send(-1)
    p:join()
    assert.equal(10000, n)
  end)
end)

describe("queue crash recovery", function()
  it("a consumer killed while blocked in get does not wedge the queue", function()
    local q, out = luamp.Queue(), luamp.Queue()
    local victim = start(function() q:get() end)
    until_waiting(q, "get", 1)
    kill(victim)
    local consumer = start(function()
      local sum = 0
      for _ = 1, 100 do sum = sum + q:get() end
      out:put(sum)
    end)
    for i = 1, 100 do q:put(i) end
    assert.equal(5050, out:get(true, 30))
    consumer:join()
    q:put("mine"); assert.equal("mine", q:get(false))
  end)

  it("a producer killed in the middle of a large put: that item is discarded", function()
    local q = luamp.Queue(2)
    local victim = stalled("ref-copy", function() q:put(string.rep("L", 8 << 20)) end)
    kill(victim)
    local p = start(function() for i = 1, 3 do q:put(i) end end)
    assert.equal(1, q:get(true, 30))
    assert.equal(2, q:get(true, 30))
    assert.equal(3, q:get(true, 30))
    p:join()
    assert.is_true(q:empty())
    q:put(string.rep("M", 8 << 20))
    assert.equal(8 << 20, #q:get(false))
  end)

  it("a producer killed while holding the lock mid-put: the others go on", function()
    local q, out = luamp.Queue(), luamp.Queue()
    q:put("first")
    local getter = start(function()
      q:get()                          -- takes "first"
      out:put(q:get())                 -- then blocks until "after"
    end)
    until_waiting(q, "get", 1)
    local victim = stalled("locked-put", function() q:put("half-written") end)
    kill(victim)                       -- dies holding the lock
    q:put("after")                     -- the next locker repairs the state
    assert.equal("after", out:get(true, 30))
    getter:join()
    assert.is_true(q:empty())
    assert.equal(0, q:qsize())
  end)

  it("a consumer killed while holding the lock mid-get leaves the item in the queue", function()
    local q = luamp.Queue()
    q:put("survivor"); q:put("next")
    local victim = stalled("locked-get", function() q:get() end)
    kill(victim)
    assert.equal("survivor", q:get(false))
    assert.equal("next", q:get(false))
  end)

  it("a consumer killed after taking a large item loses only that item", function()
    local q = luamp.Queue()
    q:put(string.rep("x", 1 << 20)); q:put("small")
    local victim = stalled("ref-get", function() q:get() end)
    kill(victim)
    assert.equal("small", q:get(false))
    assert.is_true(q:empty())
    q:put(string.rep("y", 1 << 20))
    assert.equal(1 << 20, #q:get(false))
  end)

  it("a blocked putter is woken after a crash under the lock", function()
    local q, out = luamp.Queue(1), luamp.Queue()
    q:put("full")
    local putter = start(function() q:put("waiting"); out:put("done") end)
    until_waiting(q, "put", 1)
    local victim = stalled("locked-get", function() q:get() end)
    kill(victim)
    assert.equal("full", q:get(true, 30))
    assert.equal("done", out:get(true, 30))
    assert.equal("waiting", q:get(true, 30))
    putter:join()
  end)
end)
