-- Errors that explain: a Remote error shows the worker's traceback as its cause, any
-- value raised as an error reads well, and Serialize errors name things as the caller
-- wrote them.
local H = require "helper"
local luamp = H.luamp
-- Task functions carry their _ENV: it must be the real global table, not busted's sandbox.
local describe, it, setup, teardown, assert = describe, it, setup, teardown, assert
local _ENV = _G

local function run_script(src, args)
  local path = H.script(src)
  local argv = args or {}
  argv[#argv + 1] = path
  local out, err, code = H.run(argv)
  os.remove(path)
  return out, err, code
end

describe("an uncaught Remote error", function()
  it("prints the worker's traceback, then the local one (host)", function()
    local _, err, code = run_script([[
local pool <close> = luamp.Pool(1)
local function deep_in_worker(x) error("boom " .. x) end
pool:map(function(x) local r = deep_in_worker(x) return r end, {7})
]])
    assert.equal(1, code)
    local cause = err:find("boom 7\nstack traceback:", 1, true)
    local link = err:find("The above error in a worker was the direct cause of the following error:", 1, true)
    local here = err:find("luamp.Remote: ", 1, true)
    assert.truthy(cause, err)
    assert.truthy(link, err)
    assert.truthy(here, err)
    assert.truthy(cause < link and link < here, err)
    -- the worker's frames: the function that raised, by name
    assert.truthy(err:sub(cause, link):find("deep_in_worker", 1, true), err)
    -- the local frames: the main chunk's line
    assert.truthy(err:sub(here):find(":3: in main chunk", 1, true), err)
  end)

  it("prints the worker's traceback in the REPL", function()
    local _, err = H.run({"-i"}, "pool = luamp.Pool(1)\n" ..
      "pool:apply(function() error('from the worker') end)\npool:close()\n")
    local cause = err:find("from the worker\nstack traceback:", 1, true)
    local link = err:find("direct cause of the following error", 1, true)
    local here = err:find("luamp.Remote: stdin:1: from the worker", 1, true)
    assert.truthy(cause and link and here and cause < link and link < here, err)
  end)

  it("is a message handler for embedders (luamp_traceback via error_report)", function()
    local pool <close> = luamp.Pool(1)
    local ok, e = pcall(pool.apply, pool, function() error("inner") end)
    assert.is_false(ok)
    local text = luamp._core.error_report(e)
    assert.truthy(text:find("inner\nstack traceback:.*direct cause.*luamp.Remote: .*inner"), text)
    -- tostring stays one line
    assert.falsy(tostring(e):find("\n"))
  end)
end)

describe("a table raised as an error", function()
  it("reads as its message in a Remote error", function()
    local pool <close> = luamp.Pool(1)
    local e = H.raises("Remote", pool.apply, pool, function() error({message = "no disk", code = 28}) end)
    assert.equal("luamp.Remote: no disk", tostring(e))
    assert.same({message = "no disk", code = 28}, e.remote_error)
    e = H.raises("Remote", pool.apply, pool, function() error({msg = "short"}) end)
    assert.equal("luamp.Remote: short", tostring(e))
    e = H.raises("Remote", pool.apply, pool, function() error({code = 3, where = "x"}) end)
    assert.equal('luamp.Remote: {code = 3, where = "x"}', tostring(e))
  end)

  it("reads as its message in a Process's stderr traceback", function()
    local _, err = run_script([[
local p = luamp.Process{target = function() error({message = "child says no"}) end}
p:start() p:join() print(p.exitcode)
]])
    assert.truthy(err:find("Process Process%-1:\nchild says no\nstack traceback:"), err)
    assert.falsy(err:find("table: 0x", 1, true), err)
  end)

  it("reads as its message or pformat at the host's top level", function()
    local _, err, code = H.run({"-e", "error({message = 'top level'})"})
    assert.equal(1, code)
    assert.truthy(err:find("^luamp: top level\nstack traceback:"), err)
    _, err = H.run({"-e", "error({1, two = 2})"})
    assert.truthy(err:find("^luamp: {1, two = 2}\nstack traceback:"), err)
    _, err = H.run({"-i"}, "error({msg = 'in the repl'})\n")
    assert.truthy(err:find("^in the repl\nstack traceback:"), err)
  end)

  it("reads as its message in a pool callback's report", function()
    local _, err = run_script([[
local pool <close> = luamp.Pool(1)
local r = pool:apply_async(function() return 1 end, nil, {callback = function() error({message = "cb failed"}) end})
r:wait() pool:close() pool:join()
]])
    assert.truthy(err:find("error in a pool callback: cb failed", 1, true), err)
  end)
end)

describe("Serialize error paths", function()
  local pool
  setup(function() pool = luamp.Pool(1) end)
  teardown(function() pool:terminate() end)
  local fh = io.tmpfile()

  it("name an upvalue of the task function", function()
    local e = H.raises("Serialize", pool.apply, pool, function() return fh:read() end)
    assert.equal("luamp.Serialize: upvalue 'fh' of the task function: cannot send a userdata (FILE*)", tostring(e))
  end)

  it("name the arguments as args[i]", function()
    local e = H.raises("Serialize", pool.apply, pool, function(...) return ... end, {1, {cfg = {fh}}})
    assert.equal("luamp.Serialize: args[2].cfg[1]: cannot send a userdata (FILE*)", tostring(e))
  end)

  it("name a map item by its place in the caller's list", function()
    local e = H.raises("Serialize", pool.map, pool, function(x) return x end, {1, 2, 3, {f = fh}, 5}, {chunksize = 5})
    assert.equal("luamp.Serialize: items[4].f: cannot send a userdata (FILE*)", tostring(e))
  end)

  it("stop at an object's metatable and name the object", function()
    local obj = setmetatable({}, {__name = "my.Thing", __index = function() return fh end})
    local e = H.raises("Serialize", pool.apply, pool, function() return obj end)
    local msg = tostring(e)
    assert.equal("luamp.Serialize: upvalue 'obj' of the task function: cannot send a userdata (FILE*) (inside a my.Thing)", msg)
    assert.falsy(msg:find("metatable", 1, true))
  end)

  -- A Pool's insides hold connections, children and pumps; which of them the encoder met
  -- first depended on hash order (a closed connection gave "handle hook failed"), so a
  -- Pool is refused as a whole, every time.
  it("name a Pool as what cannot be sent, every time", function()
    for _ = 1, 20 do
      local other <close> = luamp.Pool(1)
      other:apply(function() end)
      local e = H.raises("Serialize", pool.apply, pool, function() return other end)
      assert.equal("luamp.Serialize: upvalue 'other' of the task function: cannot send a luamp.Pool (it works only in the process that made it)", tostring(e))
    end
  end)

  it("put an upvalue of a nested function in parentheses before a key", function()
    local cfg = {fh}
    local function helper() return cfg end
    local e = H.raises("Serialize", luamp.dumps, {helper})
    assert.equal("luamp.Serialize: (upvalue 'cfg' of value[1])[1]: cannot send a userdata (FILE*)", tostring(e))
  end)
end)
