-- The parent's work per task (issue 16): a map of tiny tasks with chunksize 1 is cut into
-- runs, many chunks per message, and the parent's bookkeeping of a run is one entry of
-- the worker's queue (a span), not a table per chunk; with more workers than CPUs a
-- dispatch round does not work out the capacity of every idle worker. Counted in Lua VM
-- instructions of the parent (a count hook), not timed: the count does not depend on
-- the machine's load. The chunks of a span are still told apart wherever one chunk
-- matters: a worker that dies, maxtasksperchild, answers per chunk (imap).
local H = require "helper"
local luamp = H.luamp
local describe, it, assert = describe, it, assert
local _ENV = _G

local range = H.range

local function sq(x) return x * x end

-- Lua VM instructions this process runs in f(), counted every STEP (a count hook: only
-- this coroutine's, where the pool's waits run).
local STEP = 100
local function vm_instructions(f)
  local n = 0
  debug.sethook(function() n = n + 1 end, "", STEP)
  local ok, err = pcall(f)
  debug.sethook()
  if not ok then error(err, 0) end
  return n * STEP
end

describe("Pool parent overhead", function()
  -- Before: about 90 per task with 2 workers and 100 with 8 (20,000 tables made and
  -- taken back); now about 15 and 20. The bound leaves room for the extra dispatch
  -- rounds of a loaded machine.
  local PER_TASK = 40
  for _, procs in ipairs({2, 8}) do
    it("a chunksize-1 map of 20,000 tiny tasks costs the parent few Lua instructions per task (Pool(" .. procs .. "))", function()
      local pool <close> = luamp.Pool(procs)
      pool:map(sq, {1, 2, 3, 4})
      local items = range(20000)
      local r
      local n = vm_instructions(function() r = pool:map(sq, items, 1) end)
      assert.equal(20000, r.n)
      for i = 1, 20000 do if r[i] ~= i * i then assert.equal(i * i, r[i]) end end
    assert.is_true(n / 20000 < PER_TASK, string.format("%.1f VM instructions per task", n / 20000))
    end)
  end

  it("a worker runs a big chunk of a map with 7 Lua VM instructions per item (task included)", function()
    -- the loop (4: get the argument, call, store, loop) and the task x * x (2), counted in
    -- the worker by a hook its initializer set; before: 8 (the argument's index was
    -- worked out per item)
    local pool <close> = luamp.Pool{processes = 1, initializer = function()
      _G.VM_COUNT = 0
      debug.sethook(function() _G.VM_COUNT = _G.VM_COUNT + 1 end, "", 1)
    end}
    pool:map(sq, {1, 2})
    local count = function() return _G.VM_COUNT end
    local c0 = pool:apply(count)
    local r = pool:map(sq, range(20000), 20000)
    local c1 = pool:apply(count)
    assert.equal(20000 * 20000, r[20000])
    local per = (c1 - c0) / 20000
    assert.is_true(per < 7.5, string.format("%.2f VM instructions per item", per))
  end)

  it("a worker runs tiny tasks of chunksize 1 with about 9 Lua VM instructions each", function()
    -- the loop over the run's items and the task, and the answer's share: before, a list
    -- of every chunk's size was made for each answer (23 per task), used only if the
    -- answers had to go one by one
    local pool <close> = luamp.Pool{processes = 1, initializer = function()
      _G.VM_COUNT = 0
      debug.sethook(function() _G.VM_COUNT = _G.VM_COUNT + 1 end, "", 1)
    end}
    local items = range(4000)
    pool:map(sq, items, 1)   -- (the estimate)
    local count = function() return _G.VM_COUNT end
    local c0 = pool:apply(count)
    local r = pool:map(sq, items, 1)
    local per = (pool:apply(count) - c0) / 4000
    assert.equal(4000 * 4000, r[4000])
    assert.is_true(per < 15, string.format("%.2f VM instructions per task", per))
  end)

  it("a worker that dies in a run fails its chunk alone; the run's other chunks run elsewhere (imap)", function()
    local pool <close> = luamp.Pool(2)
    local function f(x)
      if x == 137 then os.exit(3) end
      return x + 1
    end
    -- (the estimate known: the imap's chunks go out in runs)
    pool:map(f, range(100), 1)
    local got, lost = 0, 0
    local it = pool:imap(f, range(400), 1)
    for i = 1, 400 do
      local ok, v = pcall(it.next, it)
      if i == 137 then
        assert.is_false(ok)
        assert.equal("WorkerLost", v.kind)
        lost = lost + 1
      else
        assert.is_true(ok, tostring(v))
        assert.equal(i + 1, v)
        got = got + 1
      end
    end
    assert.is_nil(it:next())
    assert.equal(399, got)
    assert.equal(1, lost)
  end)

  it("a map with chunksize 1 keeps every result when workers die or retire", function()
    local pool <close> = luamp.Pool{processes = 2, maxtasksperchild = 7}
    local r = pool:map(sq, range(500), 1)
    for i = 1, 500 do assert.equal(i * i, r[i]) end
    local p2 <close> = luamp.Pool(2)
    p2:map(sq, range(100), 1)
    H.raises("WorkerLost", p2.map, p2, function(x) if x == 300 then os.exit(2) end return x end, range(1000), 1)
    r = p2:map(sq, range(3000), 1)
    assert.equal(3000, r.n)
    assert.equal(3000 * 3000, r[3000])
  end)
end)
