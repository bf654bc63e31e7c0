-- A queue's producers and consumers each have a lock of their own (runtime/queue.c): one
-- side stopped or killed inside its lock never holds up the other side, and what a
-- producer killed halfway leaves behind is repaired by the next producer.
local H = require "helper"
local luamp = H.luamp
local core = luamp._core

local start = H.start

local stalled, kill = H.stalled, H.kill9

describe("queue sides", function()
  it("a producer stopped inside its lock does not hold up getters", function()
    local q = luamp.Queue()
    q:put("a"); q:put("b")
    local victim = stalled("locked-put", function() q:put("never") end)
    local t0 = luamp.time()
    assert.equal("a", q:get(true, 2))
    assert.equal("b", q:get(true, 2))
    H.raises("Empty", q.get, q, true, 0.05)   -- the stopped put has not happened
    assert.is_true(luamp.time() - t0 < 1.5)
    kill(victim)
    q:put("after")
    assert.equal("after", q:get(false))
  end)

  it("a consumer stopped inside its lock does not hold up putters", function()
    local q = luamp.Queue(3)
    q:put("x")
    local victim = stalled("locked-get", function() q:get() end)
    local t0 = luamp.time()
    q:put("y", true, 2)
    q:put("z", true, 2)
    H.raises("Full", q.put, q, "w", true, 0.05)   -- maxsize still counts the item being taken
    assert.is_true(luamp.time() - t0 < 1.5)
    kill(victim)
    assert.equal("x", q:get(false))
    assert.equal("y", q:get(false))
    assert.equal("z", q:get(false))
    assert.is_true(q:empty())
  end)

  it("a producer killed while moving to a new chunk: the next put goes where it would have", function()
    local q = luamp.Queue()
    local big = string.rep("c", 30000)
    -- 8 records of 30 KB: the first 256 KiB chunk has no room for a 9th
    for i = 1, 8 do q:put(big .. i) end
    local victim = stalled("chunk-link", function() q:put(big .. 9) end)
    kill(victim)                      -- died after marking the chunk as left, before its commit
    for i = 1, 8 do assert.equal(big .. i, q:get(false)) end
    q:put("small")                    -- fits the first chunk again: the mark must go
    assert.equal("small", q:get(false))
    q:put(big .. 10)
    q:put(big .. 11)                  -- this one moves to a new chunk for real
    assert.equal(big .. 10, q:get(false))
    assert.equal(big .. 11, q:get(false))
    assert.is_true(q:empty())
  end)

  it("one producer and one consumer pass 20,000 items of mixed sizes across chunks, in order", function()
    local q = luamp.Queue()
    local N = 20000
    local function item(i) return i % 7 == 0 and string.rep(string.char(65 + i % 26), i % 3000) or i end
    local p = start(function() for i = 1, N do q:put(item(i)) end end)
    for i = 1, N do
      local v = q:get(true, 30)
      if v ~= item(i) then error("item " .. i .. " out of order or damaged", 0) end
    end
    p:join()
    assert.equal(0, p.exitcode)
    assert.is_true(q:empty())
  end)

  it("a JoinableQueue counts task_done against puts made by other processes", function()
    local q = luamp.JoinableQueue()
    local p = start(function() for i = 1, 100 do q:put(i) end end)
    p:join()
    for _ = 1, 100 do q:get(false); q:task_done() end
    assert.is_true(q:join(1))
    H.raises("Value", q.task_done, q)
  end)
end)

describe("queue items", function()
  -- put encodes nil, booleans, numbers and strings without the full encoder, and get
  -- decodes numbers, booleans and nil without it: same bytes, same values
  local values = {true, false, 0, 1, 127, 128, -1, -128, -129, 32767, 32768, -32769,
                  2147483647, 2147483648, -2147483649, math.maxinteger, math.mininteger,
                  0.5, -0.0, 1 / 0, -1 / 0, 2 ^ 53, "", "abc", string.rep("s", 8),
                  string.rep("t", 16), string.rep("u", 31), string.rep("v", 32),
                  string.rep("w", 63), string.rep("x", 64), string.rep("y", 1000),
                  string.rep("z", 40000)}

  it("are the bytes luamp.dumps makes, and come back as the same values", function()
    local q = luamp.Queue()
    for i, v in ipairs(values) do
      q:put(v)
      assert.equal(luamp.dumps(v), q:_get_raw(false), "value " .. i)
      q:put(v)
      local got = q:get(false)
      assert.equal(math.type(v), math.type(got), "value " .. i)
      assert.equal(v, got, "value " .. i)
    end
    q:put(nil)
    assert.equal(luamp.dumps(nil), q:_get_raw(false))
    q:put(nil)
    assert.is_nil(q:get(false))
    q:put(0 / 0)
    local nan = q:get(false)
    assert.is_true(nan ~= nan)
    assert.equal(0, q:qsize())
  end)

  it("that are not plain still go through the full codec", function()
    local q = luamp.Queue()
    local t = {1, "two", {three = 3}}
    q:put(t)
    assert.same(t, q:get(false))
    H.raises("Serialize", q.put, q, coroutine.create(function() end))
    assert.is_true(q:empty())
  end)
end)

describe("queue sides, chunks", function()
  it("a getter goes through many chunks while a producer is stopped inside its lock", function()
    local q, out = luamp.Queue(), luamp.Queue()
    local big = string.rep("k", 30000)
    for i = 1, 60 do q:put(big .. i) end       -- 8 a chunk: the getter leaves 7 chunks behind
    q:put(string.rep("L", 1 << 20))           -- a large item: its extent is freed by the get too
    local victim = stalled("locked-put", function() q:put("never") end)
    local getter = start(function()
      local ok = 0
      for i = 1, 60 do if q:get(true, 5) == big .. i then ok = ok + 1 end end
      if #q:get(true, 5) == 1 << 20 then ok = ok + 1 end
      out:put(ok)
    end)
    assert.equal(61, out:get(true, 10))        -- before: the getter waited for the stopped lock
    getter:join()
    assert.equal(0, getter.exitcode)
    kill(victim)
    q:put("after")
    assert.equal("after", q:get(false))
    assert.is_true(q:empty())
  end)

  it("a forked child does not free again what its parent had left to free", function()
    local q = luamp.Queue()
    local function big(c) return string.rep(c, 1 << 20) end
    q:put(big("a")); q:put(big("b")); q:put(big("c"))
    local victim = stalled("locked-put", function() q:put("never") end)
    assert.equal(big("a"), q:get(false))       -- its extent waits for the stopped lock
    kill(victim)
    local child = start(function() q:get() end)   -- "b"; inherited the parent's list
    child:join()
    assert.equal(0, child.exitcode)
    assert.equal(big("c"), q:get(false))       -- frees "a" (and "c")
    q:put(big("x")); q:put(big("y"))           -- twice freed, "a"'s extent would serve both
    assert.equal(big("x"), q:get(false))
    assert.equal(big("y"), q:get(false))
  end)
end)
