-- The REPL as a lab: top-level locals outlive their line, and global functions defined
-- or changed after a Pool was made reach its workers (in scripts too).
local H = require "helper"
local luamp = H.luamp
-- Task functions carry their _ENV: it must be the real global table, not busted's sandbox.
local describe, it, setup, teardown, assert = describe, it, setup, teardown, assert
local _ENV = _G

local function repl(lines)
  return H.run({"-i"}, table.concat(lines, "\n") .. "\n")
end

describe("top-level locals in the REPL", function()
  it("persist across lines", function()
    local out, err = repl{
      "local function sq(x) return x * x end",
      "sq(4)",
      "local a, b = 1, 2",
      "a + b",
      "local z",
      "z",
      "local s = 'local y = 3' -- local w = 1",
      "s, y, w",
    }
    assert.equal("", err)
    assert.equal('16\n3\nnil\n"local y = 3"\tnil\tnil\n', out)
  end)

  it("stay local inside blocks and functions, and with attributes", function()
    local out, err = repl{
      "do local q = 1 end",
      "q",
      "for i = 1, 2 do local u = i end",
      "u",
      "local f = function() local inner = 1 return inner end",
      "f(), inner",
      "local c <const> = 5",
      "c",
    }
    assert.equal("", err)
    assert.equal("nil\nnil\n1\tnil\nnil\n", out)
  end)

  it("keep error positions where they were typed", function()
    local _, err = repl{"local e = 1; error('here')"}
    assert.truthy(err:find("^stdin:1: here"), err)
  end)

  it("reach a pool: a local function typed after the Pool is made", function()
    local out, err = repl{
      "pool = luamp.Pool(2)",
      "local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end",
      "pool:map(fib, {10, 20})",
      "pool:map(function(x) return fib(x) + 1 end, {10})",
      "pool:close()",
    }
    assert.equal("", err)
    assert.equal("{55, 6765, n = 2}\n{56, n = 1}\n", out)
  end)
end)

describe("global functions and pool workers", function()
  it("a task sees a global function defined after the Pool (script)", function()
    local path = H.script([[
local pool <close> = luamp.Pool(2)
function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
print(table.concat(pool:map(function(x) return fib(x) end, {10, 20}), " "))
function fib(n) return -n end                 -- changed: the workers get the new one
print(table.concat(pool:map(function(x) return fib(x) end, {10, 20}), " "))
function twice(x) return 2 * plus_one(x) end  -- read through another global function
function plus_one(x) return x + 1 end
print(pool:apply(function() return twice(3) end))
local fh = io.tmpfile()
function log(x) fh:write(x) end               -- cannot cross: not sent, as before
print(pcall(pool.apply, pool, function() return log end))
]])
    local out, err, code = H.run({path})
    os.remove(path)
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("55 6765\n-10 -20\n8\ntrue\tnil\n", out)
  end)

  it("each worker gets a changed function once", function()
    local pool <close> = luamp.Pool(1)
    _G.spec_counter_fn = function() return 1 end
    local f = function() return spec_counter_fn() end
    assert.equal(1, pool:apply(f))
    assert.equal(1, pool:apply(f))
    _G.spec_counter_fn = function() return 2 end
    assert.equal(2, pool:apply(f))
    _G.spec_counter_fn = nil
  end)
end)

describe("a pool interrupted by Ctrl-C in the REPL", function()
  it("says it was terminated and how to go on", function()
    local P = require "pty"
    local history = os.tmpname()
    local ok, transcript = P.session({}, {
      P.prompt(), P.send("pool = luamp.Pool(2)\r"),
      -- the worker says when it runs the task: the parent is then waiting on the pool
      P.prompt(), P.send("pool:map(function(x) print('sta' .. 'rted') io.stdout:flush() luamp.sleep(x) end, {30})\r"),
      P.expect("started\r\n"),
      P.send("\3"),
      P.expect("luamp\\.Interrupted: interrupted!? \\(the pool was terminated: make a new luamp\\.Pool to go on\\)"),
      P.prompt(), P.send("pool:apply(print)\r"),
      P.expect("Pool not running: Ctrl-C terminated it; make a new one, e\\.g\\. pool = luamp\\.Pool\\(2\\)"),
      P.prompt(), P.send("pool = luamp.Pool(2)\r"),
      P.prompt(), P.send("pool:apply(function() return 6 * 7 end)\r"),
      P.expect("\r\n42\r\n"),
      P.prompt(), P.send("\4"), P.exit(0)}, {LUAMP_HISTORY = history})
    os.remove(history)
    assert(ok, transcript)
  end)
end)

describe("children's output at the prompt", function()
  it("is written above the prompt, which is drawn again with what was typed", function()
    local P = require "pty"
    local history = os.tmpname()
    local ok, transcript = P.session({}, {
      P.prompt(),
      P.send("p = luamp.Process{target = function() luamp.sleep(1) print('from ' .. 'child') end} p:start()\r"),
      P.prompt(), P.send("1 + "), P.expect("1 \\+ "),
      -- the child's line, then the prompt again (with "1 + " when typed before it came)
      P.expect("from child\r+\n> "),
      P.send("2\r"), P.expect("\r\n3\r\n"),
      P.prompt(), P.send("p:join()\r"), P.prompt(), P.send("p.exitcode\r"), P.expect("\r\n0\r\n"),
      P.prompt(), P.send("\4"), P.exit(0)}, {LUAMP_HISTORY = history})
    os.remove(history)
    assert(ok, transcript)
  end)
end)
