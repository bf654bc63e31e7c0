-- Runs the synchronisation and shared-memory example ports in scripts/examples/.
local H = require "helper"

local example = H.example

local lines = H.lines

local function count(list, pattern)
  local n = 0
  for _, l in ipairs(list) do
    if l:match(pattern) then n = n + 1 end
  end
  return n
end

describe("sync examples", function()
  it("lock_hello: ten whole lines, one per process", function()
    local seen = {}
    local l = lines(example("lock_hello.lua"))
    assert.equal(10, #l)
    for _, s in ipairs(l) do
      local i = tonumber(s:match("^hello TTS\t(%d)$"))
      assert.truthy(i, s)
      assert.is_nil(seen[i])
      seen[i] = true
    end
  end)

  it("value_array: the child's writes are seen by the parent", function()
    assert.equal("3.1415927\n0, -1, -2, -3, -4, -5, -6, -7, -8, -9\n", example("value_array.lua"))
  end)

  it("lock_counter: 100 processes count to exactly 100", function()
    local l = lines(example("lock_counter.lua"))
    assert.equal("------------------------", l[1])
    assert.truthy(l[2]:match("^process id:\t%d+$"))
    assert.equal("100", l[3])
  end)

  it("semaphore_workers: every worker gets and releases the semaphore", function()
    local l = lines(example("semaphore_workers.lua", "0.02"))
    assert.equal(30, #l)
    assert.equal(10, count(l, "^thread %d acquire semaphore$"))
    assert.equal(10, count(l, "^thread %d get semaphore do something$"))
    assert.equal(10, count(l, "^thread %d release semaphore$"))
  end)

  it("schedule_once: printx is started by exactly one of three processes", function()
    local l = lines(example("schedule_once.lua", "2"))
    assert.equal(1, count(l, "^printx is running%.%.%.$"))
    assert.equal(2, count(l, "^printx has ran%.$"))
    assert.equal(2, count(l, "^hello x$"))
  end)

  it("balance: the locked deposits and withdrawals leave 0", function()
    assert.equal("0\n", example("balance.lua", "2000"))
  end)

  it("rlock: re-entry by the holder, the child waits for the last release", function()
    local l = lines(example("rlock.lua"))
    assert.truthy(l[1]:match("^<RLock locked=true owner=%d+ depth=2>$"), l[1])
    assert.equal("released once, still held:\ttrue", l[2])
    assert.equal("child got the lock", l[3])
    assert.equal("<RLock locked=false>", l[4])
  end)
end)
