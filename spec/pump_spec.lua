-- Background pumps in the wait primitive (wait.c): functions that run, during any luamp
-- wait or luamp.poll(), when their descriptor is readable.
local H = require "helper"
local luamp = H.luamp
local core = luamp._core

describe("background pumps", function()
  it("run inside an unrelated wait, which then goes on", function()
    local in_r, in_w = luamp.Pipe(false)
    local out_r, out_w = luamp.Pipe(false)
    core.pump_add(in_r:fileno(), function()
      while in_r:poll() do out_w:send(in_r:recv() * 2) end
    end)
    local p = luamp.Process{target = function() in_w:send(21) end}
    p:start()
    assert.equal(42, out_r:recv())     -- only the pump can make this arrive
    core.pump_remove(in_r:fileno())
    p:join()
  end)

  it("luamp.poll() runs the ready ones without blocking", function()
    local r, w = luamp.Pipe(false)
    local got
    core.pump_add(r:fileno(), function() got = r:recv() end)
    assert.equal(0, luamp.poll())
    w:send("x")
    assert.equal(1, luamp.poll())
    assert.equal("x", got)
    core.pump_remove(r:fileno())
    w:send("y")
    assert.equal(0, luamp.poll())
  end)

  it("a pump that raises is reported and dropped", function()
    -- in a child process, whose stderr (the report) is checked rather than shown
    local script = H.script([[
      local luamp = require "luamp"
      local r, w = luamp.Pipe(false)
      local calls = 0
      luamp._core.pump_add(r:fileno(), function() calls = calls + 1; error("pump broke") end)
      w:send(1)
      luamp.poll()
      luamp.poll()
      io.write(calls)
    ]])
    local out, err, code = H.run({script})
    os.remove(script)
    assert.equal(0, code, err)
    assert.equal("1", out)
    assert.truthy(err:find("^luamp: error in a background callback %(dropped%): [^\n]*: pump broke\n"), err)
  end)

  it("is not run by a forked child's waits", function()
    local r, w = luamp.Pipe(false)
    local ran = false
    core.pump_add(r:fileno(), function() ran = true; r:recv() end)
    w:send(1)
    local p = luamp.Process{target = function()
      luamp.sleep(0.01)
      os.exit(ran and 1 or 0)
    end}
    p:start()
    p:join()
    assert.equal(0, p.exitcode)
    core.pump_remove(r:fileno())
  end)

  it("is not re-entered from a wait inside its own function", function()
    local r, w = luamp.Pipe(false)
    local depth, deepest = 0, 0
    core.pump_add(r:fileno(), function()
      depth = depth + 1
      deepest = math.max(deepest, depth)
      luamp.sleep(0.01)                 -- r is still readable here
      r:recv()
      depth = depth - 1
    end)
    w:send(1)
    luamp.poll()
    assert.equal(1, deepest)
    core.pump_remove(r:fileno())
  end)
end)
