-- Runs the Queue and Pipe example ports in scripts/examples/ through the luamp host.
local H = require "helper"

local example = H.example

-- The values of the lines matching pat (one capture), in order.
local function captures(out, pat)
  local t = {}
  for line in out:gmatch("[^\n]+") do
    local v = line:match(pat)
    if v then t[#t + 1] = v end
  end
  return t
end

local function prefix_of(list, full)
  for i, v in ipairs(list) do
    if full[i] ~= v then return false end
  end
  return true
end

local ABCDE = {"A", "B", "C", "D", "E"}

describe("Queue and Pipe examples", function()
  it("queue_put_get", function()
    assert.equal('{42, nil, "hello"}\n', example("queue_put_get.lua"))
  end)

  it("pipe_send_recv", function()
    assert.equal('{42, nil, "hello"}\n', example("pipe_send_recv.lua"))
  end)

  it("queue_write_read: everything written is read, in order", function()
    local out = example("queue_write_read.lua", "0.01")
    assert.truthy(out:match("Process to write: %d+\n"))
    assert.truthy(out:match("Process to read: %d+\n"))
    assert.same({"A", "B", "C"}, captures(out, "^Put (%u) to queue%.%.%.$"))
    assert.same({"A", "B", "C"}, captures(out, "^Get (%u) from queue%.$"))
    assert.truthy(out:find("Put C to queue...", 1, true) < out:find("Get C from queue.", 1, true))
  end)

  it("queue_read_while_not_empty: the reader takes a prefix of what was written", function()
    local out = example("queue_read_while_not_empty.lua", "0.01")
    assert.same(ABCDE, captures(out, "^Put (%u) to queue %.%.%.$"))
    assert.truthy(prefix_of(captures(out, "^Get (%u) from queue %.%.%.$"), ABCDE))
    assert.truthy(out:find("read q and q status: \t", 1, true))
  end)

  it("queue_read_forever: the reader is terminated after the writer ends", function()
    local out = example("queue_read_forever.lua", "terminate", "0.01")
    assert.same(ABCDE, captures(out, "^Put (%u) to queue %.%.%.$"))
    assert.truthy(prefix_of(captures(out, "^Get (%u) from queue %.%.%.$"), ABCDE))
    assert.truthy(out:find("reader exit code\t-15\n", 1, true))
  end)

  it("queue_read_forever until-empty: the reader has taken everything", function()
    local out = example("queue_read_forever.lua", "until-empty", "0.01")
    local got = captures(out, "^Get (%u) from queue %.%.%.$")
    assert.truthy(#got >= 4 and prefix_of(got, ABCDE))
    assert.truthy(out:find("reader exit code\t-15\n", 1, true))
  end)

  it("pipe_lock_readers: two readers share one end, taking turns", function()
    if not H.luamp.Lock then return pending("needs luamp.Lock (synchronisation issue)") end
    local out = example("pipe_lock_readers.lua", "0.01")
    assert.same(ABCDE, captures(out, "^Put (%u) to queue %.%.%.$"))
    assert.same({"A", "B", "C", "D"}, captures(out, "^read q and q status: \t(%u)$"))
  end)
end)
