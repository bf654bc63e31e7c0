local H = require "helper"
local luamp = H.luamp

local start = H.start

local until_waiting = H.until_waiting

describe("Queue", function()
  it("is first in, first out, for any value the codec takes", function()
    local q = luamp.Queue()
    local t = {1, {2, 3}, x = "y"}
    q:put(1); q:put("two"); q:put(t); q:put(false); q:put(3.5)
    assert.equal(5, q:qsize())
    assert.equal(1, q:get())
    assert.equal("two", q:get())
    assert.same(t, q:get())
    assert.equal(false, q:get())
    assert.equal(3.5, q:get())
    assert.is_true(q:empty())
  end)

  it("carries a value put by a child to the parent", function()
    local q = luamp.Queue()
    local p = start(function() q:put({42, nil, "hello", n = 3}) end)
    assert.same({42, nil, "hello", n = 3}, q:get())
    p:join()
  end)

  it("raises Full when bounded and full, honouring block and timeout", function()
    local q = luamp.Queue(2)
    q:put(1); q:put(2)
    assert.is_true(q:full())
    H.raises("Full", q.put, q, 3, false)
    H.raises("Full", q.put_nowait, q, 3)
    local t0 = luamp.time()
    H.raises("Full", q.put, q, 3, false, 5)       -- block=false ignores the timeout
    assert.truthy(luamp.time() - t0 < 1)
    t0 = luamp.time()
    H.raises("Full", q.put, q, 3, true, 0.1)
    assert.truthy(luamp.time() - t0 >= 0.09)
    assert.equal(2, q:qsize())
    assert.equal(1, q:get())
    q:put_nowait(3)
    assert.equal(2, q:get()); assert.equal(3, q:get())
  end)

  it("raises Empty when empty, honouring block and timeout", function()
    local q = luamp.Queue()
    H.raises("Empty", q.get, q, false)
    H.raises("Empty", q.get_nowait, q)
    local t0 = luamp.time()
    H.raises("Empty", q.get, q, false, 5)
    assert.truthy(luamp.time() - t0 < 1)
    t0 = luamp.time()
    H.raises("Empty", q.get, q, true, 0.1)
    assert.truthy(luamp.time() - t0 >= 0.09)
    H.raises("Value", q.get, q, true, "soon")
  end)

  it("counts items for maxsize whatever their size", function()
    local q = luamp.Queue(3)
    q:put(string.rep("a", 1 << 20)); q:put(1); q:put(string.rep("b", 100000))
    assert.is_true(q:full())
    H.raises("Full", q.put_nowait, q, 2)
    assert.equal(1 << 20, #q:get())
    assert.equal(1, q:get())
    assert.equal(100000, #q:get())
  end)

  it("treats maxsize <= 0 as unbounded and accepts an options table", function()
    assert.is_false(luamp.Queue(0):full())
    assert.is_false(luamp.Queue(-5):full())
    local q = luamp.Queue{maxsize = 1}
    q:put(1)
    assert.is_true(q:full())
    H.raises("Value", luamp.Queue, "big")
    H.raises("Value", luamp.Queue, 1.5)
    H.raises("Value", luamp.Queue, {size = 3})
  end)

  it("raises Serialize at put for an unsendable value and leaves the queue untouched", function()
    local q = luamp.Queue()
    q:put("before")
    H.raises("Serialize", q.put, q, {co = coroutine.create(print)})
    assert.equal(1, q:qsize())
    assert.equal("before", q:get())
    assert.is_true(q:empty())
  end)

  it("passes items larger than any chunk, in order with small ones", function()
    local q = luamp.Queue()
    local big = {}
    for i = 1, 5 do big[i] = string.rep(string.char(64 + i), (3 << 20) + i) end
    local p = start(function()
      for i = 1, 5 do q:put(big[i]); q:put(i) end
    end)
    for i = 1, 5 do
      assert.is_true(q:get() == big[i])
      assert.equal(i, q:get())
    end
    p:join()
  end)

  it("wakes a getter blocked in another process", function()
    local q, done = luamp.Queue(), luamp.Queue()
    local p = start(function() done:put(q:get() + 1) end)
    until_waiting(q, "get", 1)
    q:put(41)
    assert.equal(42, done:get())
    p:join()
  end)

  it("wakes a putter blocked on a full queue when an item is taken", function()
    local q = luamp.Queue(1)
    q:put("first")
    local p = start(function() q:put("second") end)
    until_waiting(q, "put", 1)
    assert.equal("first", q:get())
    assert.equal("second", q:get())
    p:join()
    assert.equal(0, p.exitcode)
  end)

  it("wakes every blocked getter when as many items arrive", function()
    local q, out = luamp.Queue(), luamp.Queue()
    local ps = {}
    for i = 1, 4 do ps[i] = start(function() out:put(q:get()) end) end
    until_waiting(q, "get", 4)
    for i = 1, 4 do q:put(i) end
    local got = {}
    for _ = 1, 4 do got[#got + 1] = out:get(true, 30) end
    table.sort(got)
    assert.same({1, 2, 3, 4}, got)
    for _, p in ipairs(ps) do p:join() end
  end)

  it("never loses what a producer put before exiting, even joined before draining", function()
    local q = luamp.Queue()
    local p = start(function()
      for i = 1, 2000 do q:put({i, string.rep("x", 1000)}) end
      q:put(string.rep("z", 5 << 20))
    end)
    p:join()                          -- Python's feeder-thread queue could deadlock here
    assert.equal(0, p.exitcode)
    assert.equal(2001, q:qsize())
    for i = 1, 2000 do assert.equal(i, q:get()[1]) end
    assert.equal(5 << 20, #q:get())
  end)

  it("raises Closed on any use after close", function()
    local q = luamp.Queue(3)
    q:put(1)
    q:close(); q:close()
    assert.equal("<Queue closed>", tostring(q))
    for _, m in ipairs({"put", "get", "put_nowait", "get_nowait", "qsize", "empty", "full"}) do
      H.raises("Closed", q[m], q, 1)
    end
  end)

  it("closing one handle leaves the queue working for other processes", function()
    local q = luamp.Queue()
    local p = start(function() q:close() end)
    p:join()
    q:put("still here")
    assert.equal("still here", q:get())
  end)

  it("takes only a queue as self: other userdata and other kinds are refused", function()
    local q, s = luamp.Queue(), luamp.SimpleQueue()
    for _, other in ipairs{io.stdout, luamp.Value("i", 0), luamp.Array("d", 200), {}, 1} do
      assert.has_error(function() q.put(other, 1) end)
      assert.has_error(function() q.get(other) end)
      assert.is_false(luamp._core.is_queue(other))
    end
    -- the queue's cookie is per object: a queue of another kind is still a queue
    s:put("x")
    assert.equal("x", q.get(s))
    assert.is_true(luamp._core.is_queue(s) and luamp._core.is_queue(q))
    q:close()
    H.raises("Closed", q.put, q, 1)
    assert.is_true(luamp._core.is_queue(q))
  end)

  it("has a readable tostring", function()
    local q = luamp.Queue(100)
    q:put(1); q:put(2); q:put(3)
    assert.equal("<Queue size=3 maxsize=100>", tostring(q))
    assert.equal("<Queue size=0>", tostring(luamp.Queue()))
  end)

  it("crosses to a forked child as a value, through another queue", function()
    local q, out = luamp.Queue(), luamp.Queue()
    local p = start(function()
      local handed = q:get()          -- a queue made before the fork, sent as a value
      handed:put("through the handed-over queue")
    end)
    q:put(out)
    assert.equal("through the handed-over queue", out:get())
    p:join()
  end)

  it("reaches a process that did not inherit it: its descriptors travel with the item", function()
    local q = luamp.Queue()
    local p = start(function()
      local late = q:get()
      late:put("through a late queue")
    end)
    until_waiting(q, "get", 1)
    local late = luamp.Queue()        -- made after the child started
    q:put(late)
    assert.equal("through a late queue", late:get(true, 10))
    p:join()
    assert.equal(0, p.exitcode)
  end)

  it("a get blocked in the host is interrupted by Ctrl-C and leaves no registration", function()
    local script = H.script([[
      local luamp = require "luamp"
      local q = luamp.Queue()
      local parent = luamp.getpid()
      local p = luamp.Process{target = function()
        while q:_waiters("get") < 1 do luamp.sleep(0.001) end
        os.execute("kill -INT " .. parent)
      end}
      p:start()
      local ok, e = pcall(q.get, q)
      p:join()
      q:put("after")
      print(e.kind, q:_waiters("get"), q:get(false))
    ]])
    local out, err, code = H.run({script})
    os.remove(script)
    assert.equal(0, code, err)
    assert.equal("Interrupted\t0\tafter\n", out)
  end)

  it("can be waited on with luamp.wait", function()
    local q = luamp.Queue()
    assert.same({}, luamp.wait({q}, 0.05))
    local p = start(function() q:put(1) end)
    assert.same({q}, luamp.wait({q}, 30))
    p:join()
    assert.equal(1, q:get())
  end)
end)

describe("SimpleQueue", function()
  it("has put, get, empty and close", function()
    local q = luamp.SimpleQueue()
    assert.is_true(q:empty())
    local p = start(function() q:put("a"); q:put({b = 1}) end)
    assert.equal("a", q:get())
    assert.same({b = 1}, q:get())
    p:join()
    assert.is_true(q:empty())
    assert.is_nil(q.qsize)
    assert.equal("<SimpleQueue size=0>", tostring(q))
    q:close()
    H.raises("Closed", q.get, q)
  end)
end)

describe("JoinableQueue", function()
  it("join returns once every item put was task_done, across processes", function()
    local q = luamp.JoinableQueue()
    local worker = start(function()
      for _ = 1, 3 do q:get(); q:task_done() end
    end)
    for i = 1, 3 do q:put(i) end
    assert.is_true(q:join())
    assert.equal("<JoinableQueue size=0 unfinished=0>", tostring(q))
    worker:join()
  end)

  it("join waits for the last task_done of another process", function()
    local q = luamp.JoinableQueue(10)
    q:put("task")
    local r, w = luamp.Pipe(false)
    local worker = start(function()
      q:get()
      r:recv_bytes()                 -- holds the task until told to finish
      q:task_done()
    end)
    assert.is_false(q:join(0.05))
    w:send_bytes("finish")
    assert.is_true(q:join(30))
    worker:join()
  end)

  it("raises Value when task_done is called too many times", function()
    local q = luamp.JoinableQueue()
    q:put(1)
    assert.equal("<JoinableQueue size=1 unfinished=1>", tostring(q))
    q:get(); q:task_done()
    H.raises("Value", q.task_done, q)
    assert.is_true(q:join())
  end)

  it("has the Queue methods and a maxsize", function()
    local q = luamp.JoinableQueue(1)
    q:put_nowait(1)
    assert.is_true(q:full())
    H.raises("Full", q.put_nowait, q, 2)
    assert.equal(1, q:qsize())
    assert.equal("<JoinableQueue size=1 maxsize=1 unfinished=1>", tostring(q))
  end)
end)

describe("Queue closed while a task of the same process waits on it", function()
  -- Tasks run one at a time: the second task starts only once the first is suspended in
  -- its wait, so the close below always meets a waiting task (no sleep involved).
  local function closed_under(q, wait, release)
    local outcome = {}
    local waiter = luamp.task(function() return wait(q) end)
    luamp.task(function()
      outcome.ok, outcome.err = pcall(q.close, q)
      release(q)                       -- ends the wait
    end)
    luamp.run()
    return outcome, waiter
  end

  it("refuses the close with Value while a get waits, and the get still gets its item", function()
    for _ = 1, 20 do
      local outcome, waiter = closed_under(luamp.Queue(),
        function(q) return q:get(true, 30) end,
        function(q) q:put("item") end)
      assert.is_false(outcome.ok)
      assert.equal("Value", outcome.err.kind)
      assert.equal("item", waiter:wait())
    end
  end)

  it("refuses it while a put waits for room and while a join waits", function()
    local outcome, waiter = closed_under(luamp.Queue(1),
      function(q) q:put(1); q:put(2, true, 30); return "put" end,
      function(q) assert.equal(1, q:get()) end)
    assert.equal("Value", outcome.err.kind)
    assert.equal("put", waiter:wait())
    outcome, waiter = closed_under(luamp.JoinableQueue(),
      function(q) q:put(1); return q:join(30) end,
      function(q) q:get(); q:task_done() end)
    assert.equal("Value", outcome.err.kind)
    assert.is_true(waiter:wait())
  end)

  it("closes once the wait has ended, through close() and <close>", function()
    local q = luamp.Queue()
    local waiter = luamp.task(function() return q:get(true, 30) end)
    luamp.task(function() q:put(7) end)
    luamp.run()
    assert.equal(7, waiter:wait())
    q:close()
    H.raises("Closed", q.get_nowait, q)
    do local q2 <close> = luamp.Queue(); q2:put(1) end
  end)
end)
