-- The luamp program's command line: like lua5.4's, with luamp built in.
local H = require "helper"
local P = require "pty"

-- Runs the host with extra environment variables (a table); returns stdout, stderr, code.
local function run_env(env, args)
  local words = {"env"}
  for k, v in pairs(env) do words[#words + 1] = H.q(k .. "=" .. v) end
  words[#words + 1] = H.q(H.host)
  for _, a in ipairs(args) do words[#words + 1] = H.q(a) end
  local errf = os.tmpname()
  local out, code = H.sh(table.concat(words, " ") .. " < /dev/null 2> " .. errf)
  local f = assert(io.open(errf))
  local err = f:read("a")
  f:close()
  os.remove(errf)
  return out, err, code
end

local function with_script(src, fn)
  local path = H.script(src)
  local ok, e = pcall(fn, path)
  os.remove(path)
  assert(ok, e)
end

describe("luamp host", function()
  it("passes the script's arguments in arg and as ...", function()
    with_script("print(arg[0], #arg, arg[1], arg[2], arg[-1]) print(select('#', ...), ...)",
      function(path)
        local out, err, code = H.run({"-W", path, "a b", "c"})
        assert.equal("", err)
        assert.equal(0, code)
        assert.equal(path .. "\t2\ta b\tc\t-W\n2\ta b\tc\n", out)
        out = H.run({"-e", "y=2", path})
        assert.equal(path .. "\t0\tnil\tnil\ty=2\n0\n", out)
      end)
    -- without a script, every word is a positive index and arg[0] is the program
    local out = H.run({"-e", "print(arg[0] == (...) , arg[1], arg[2])"})
    assert.equal("false\t-e\tprint(arg[0] == (...) , arg[1], arg[2])\n", out)
  end)

  it("turns warnings on with -W", function()
    local _, err = H.run({"-W", "-e", "warn('careful')"})
    assert.equal("Lua warning: careful\n", err)
    _, err = H.run({"-e", "warn('careful')"})
    assert.equal("", err)
  end)

  it("runs -e statements and -l libraries in command-line order", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir " .. H.q(dir)))
    local f = assert(io.open(dir .. "/mymod.lua", "w"))
    f:write("order = (order or '') .. 'L' return {name = 'mymod'}")
    f:close()
    local path_stmt = "package.path = " .. string.format("%q", dir .. "/?.lua")
    local out, err, code = H.run({"-e", path_stmt, "-e", "order = 'E'", "-l", "mymod",
      "-l", "alias=mymod", "-e", "print(order, mymod.name, alias == mymod)"})
    os.remove(dir .. "/mymod.lua")
    os.remove(dir)
    assert.equal("", err)
    assert.equal(0, code)
    assert.equal("EL\tmymod\ttrue\n", out)
  end)

  it("opens luamp as a global that require also returns", function()
    local out = H.run({"-e", "print(type(luamp.Process), require('luamp') == luamp)"})
    assert.equal("function\ttrue\n", out)
  end)

  it("prints its version with -v", function()
    local out, err, code = H.run({"-v"})
    assert.equal(0, code)
    assert.equal("", err)
    assert.matches("^luamp " .. H.luamp.version:gsub("%.", "%%.") .. " %(Lua 5%.4%.%d+%)\n$", out)
  end)

  it("reads the script from stdin with -, and when stdin is not a terminal", function()
    local out, _, code = H.run({"-", "x", "y"}, "print(arg[0], ...)")
    assert.equal(0, code)
    assert.equal("-\tx\ty\n", out)
    out, _, code = H.run({}, "print('piped', 1 + 1)")
    assert.equal(0, code)
    assert.equal("piped\t2\n", out)
  end)

  it("stops options at --", function()
    with_script("print(...)", function(path)
      local out = H.run({"--", path, "-e", "-v"})
      assert.equal("-e\t-v\n", out)
    end)
  end)

  it("runs LUA_INIT_5_4 or LUA_INIT first (code or @file), unless -E", function()
    local out, err, code = run_env({LUA_INIT = "print('init')"}, {"-e", "print('main')"})
    assert.equal("init\nmain\n", out)
    assert.equal(0, code, err)
    out = run_env({LUA_INIT = "print('old')", LUA_INIT_5_4 = "print('new')"}, {"-e", "print('main')"})
    assert.equal("new\nmain\n", out)
    with_script("print('from file')", function(path)
      out = run_env({LUA_INIT = "@" .. path}, {"-e", "print('main')"})
      assert.equal("from file\nmain\n", out)
    end)
    out = run_env({LUA_INIT = "print('init')"}, {"-E", "-e", "print('main')"})
    assert.equal("main\n", out)
    local _, err2, code2 = run_env({LUA_INIT = "error('bad init')"}, {"-e", "print('main')"})
    assert.equal(1, code2)
    assert.matches("LUA_INIT:1: bad init", err2)
  end)

  it("reports an uncaught error with a traceback on stderr and exits 1", function()
    with_script("local function f() error('boom') end\nf()\n", function(path)
      local out, err, code = H.run({path})
      assert.equal(1, code)
      assert.equal("", out)
      assert.matches("^luamp: [^\n]*:1: boom\nstack traceback:\n", err)
      assert.truthy(err:find("'f'", 1, true), err)
    end)
  end)

  it("prints error objects through their __tostring", function()
    local _, err, code = H.run({"-e", "luamp.sleep(-1)"})
    assert.equal(1, code)
    assert.matches("^luamp: luamp.Value: [^\n]+\nstack traceback:", err)
    _, err, code = H.run({"-e", "error(setmetatable({}, {__tostring = function() return 'custom' end}))"})
    assert.equal(1, code)
    assert.matches("^luamp: custom\n", err)
    _, err, code = H.run({"-e", "error({})"})
    assert.equal(1, code)
    assert.matches("^luamp: {}\n", err)
  end)

  it("reports syntax errors and missing scripts", function()
    local _, err, code = H.run({"-e", "x = = 1"})
    assert.equal(1, code)
    assert.matches("^luamp: %(command line%):1: unexpected symbol", err)
    _, err, code = H.run({"/nonexistent/script.lua"})
    assert.equal(1, code)
    assert.matches("^luamp: cannot open /nonexistent/script.lua", err)
  end)

  it("refuses unknown options with the usage", function()
    local out, err, code = H.run({"-x"})
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches("^luamp: unrecognized option '%-x'\nusage: luamp ", err)
    _, err, code = H.run({"-e"})
    assert.equal(1, code)
    assert.matches("^luamp: '%-e' needs argument", err)
  end)

  it("honours os.exit", function()
    local _, _, code = H.run({"-e", "os.exit(7)"})
    assert.equal(7, code)
    _, _, code = H.run({"-e", "os.exit(false)"})
    assert.equal(1, code)
    _, _, code = H.run({"-e", "io.write('x') os.exit(true, true)"})
    assert.equal(0, code)
  end)

  it("waits at the end for the children the script did not join", function()
    local flag = os.tmpname()
    os.remove(flag)
    -- the child lets go of stdout at once, so only the host's own exit is waited for
    local code
    with_script([[
      local p = luamp.Process{target = function(path)
        io.stdout:close()
        luamp.sleep(0.3)
        assert(io.open(path, "w")):close()
      end, args = {...}}
      p:start()
    ]], function(path) _, _, code = H.run({path, flag}) end)
    local f = io.open(flag)
    if f then f:close() end
    os.remove(flag)
    assert.equal(0, code)
    assert.truthy(f, "the host exited before its child finished")
  end)

  it("enters the REPL after the script with -i", function()
    with_script("greeting = 'hello from the script'", function(path)
      local out, _, code = H.run({"-i", path}, "greeting\n")
      assert.equal(0, code)
      assert.equal('"hello from the script"\n', out)
    end)
  end)

  describe("on Ctrl-C", function()
    local ready = "io.write('ready\\n') io.flush() "

    it("stops a script blocked in luamp.sleep with Interrupted and exits 130", function()
      with_script(ready .. "luamp.sleep(100)", function(path)
        local ok, transcript = P.session({path}, {
          P.expect("ready"), P.signal("INT"),
          P.expect("luamp: luamp\\.Interrupted: interrupted"), P.exit(130)})
        assert(ok, transcript)
      end)
    end)

    it("stops a script running a Lua loop and exits 130", function()
      with_script(ready .. "local n = 0 while true do n = n + 1 end", function(path)
        local ok, transcript = P.session({path}, {
          P.expect("ready"), P.signal("INT"),
          P.expect("luamp: luamp\\.Interrupted: interrupted!"), P.exit(130)})
        assert(ok, transcript)
      end)
    end)

    it("raises Interrupted that the script can catch and go on", function()
      -- "ready" is written inside the pcall: wherever the signal lands, it is caught
      with_script([[
        local ok, e = pcall(function() ]] .. ready .. [[ luamp.sleep(100) end)
        print("caught", e.kind)
        os.exit(3)
      ]], function(path)
        local ok, transcript = P.session({path}, {
          P.expect("ready"), P.signal("INT"), P.expect("caught\tInterrupted"), P.exit(3)})
        assert(ok, transcript)
      end)
    end)
  end)
end)
