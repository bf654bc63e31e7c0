-- The value codec: luamp.dumps / luamp.loads, as every value crossing a process boundary
-- goes through it.
local H = require "helper"
local luamp = H.luamp
local dumps, loads = luamp.dumps, luamp.loads

-- luamp's own processes decode each other's messages trusted: round trips do the same
local TRUSTED = {trusted = true}
local function rt(v) return loads(dumps(v), TRUSTED) end

-- Structural equality: same types (math.type too), floats bit for bit (nan, -0.0),
-- tables key by key with cycles followed in step, metatables compared the same way.
local function same(a, b, seen)
  seen = seen or {}
  if type(a) ~= type(b) then return false end
  if type(a) == "number" then
    if math.type(a) ~= math.type(b) then return false end
    if a ~= a then return b ~= b end
    return a == b and (a ~= 0 or 1 / a == 1 / b)
  end
  if type(a) ~= "table" or rawequal(a, b) then return rawequal(a, b) end
  if seen[a] then return seen[a] == b end
  seen[a] = b
  for k, v in next, a do
    if type(k) ~= "table" and not same(v, rawget(b, k), seen) then return false end
  end
  for k in next, b do
    if type(k) ~= "table" and rawget(a, k) == nil then return false end
  end
  local ma, mb = getmetatable(a), getmetatable(b)
  if (ma == nil) ~= (mb == nil) then return false end
  return ma == nil or same(ma, mb, seen)
end

local function serialize_error(fn, ...)
  return H.raises("Serialize", fn, ...).message
end

describe("codec scalars", function()
  it("round-trip exactly, keeping integer and float apart", function()
    local values = {true, false, 0, 1, -1, 127, 128, -128, -129, 32767, 65536, -2^31 | 0,
      2^31 | 0, 2^53 + 1 | 0, math.maxinteger, math.mininteger, 0.0, 1.0, -1.5, 0.1,
      5e-324, 1.7976931348623157e308, math.pi, math.huge, -math.huge}
    for _, v in ipairs(values) do
      local back = rt(v)
      assert.equal(math.type(v), math.type(back))
      assert.equal(v, back)
    end
    assert.is_nil(rt(nil))
  end)

  it("keep nan and the sign of zero", function()
    local n = rt(0 / 0)
    assert.is_true(n ~= n)
    assert.equal(-math.huge, 1 / rt(-0.0))
    assert.equal(math.huge, 1 / rt(0.0))
  end)

  it("keep binary strings, every byte and length", function()
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    all = table.concat(all)
    for _, s in ipairs({"", "\0", "a\0b", all, all:rep(3), ("x"):rep(63), ("x"):rep(64),
                        ("x"):rep(200)}) do
      assert.equal(s, rt(s))
    end
  end)

  it("carry a 1 MB string", function()
    local s = ("0123456789abcdef"):rep(65536)
    assert.equal(s, rt(s))
  end)
end)

describe("codec tables", function()
  it("round-trip nested, mixed and sparse tables", function()
    local t = {1, 2.5, "three", {4, {5}}, nil, 7, a = 1, b = {c = {d = "e"}},
      [true] = false, [2.5] = "float key", [-3] = "neg", [100] = "far"}
    assert.is_true(same(t, rt(t)))
    assert.is_true(same({}, rt({})))
    local holes = {}
    holes[1], holes[3], holes[1000] = 1, 3, 1000
    assert.is_true(same(holes, rt(holes)))
  end)

  it("keep string keys that look like numbers apart from number keys", function()
    local t = {10, 20, ["3"] = "s3", ["1"] = "s1", [3] = 30}
    local back = rt(t)
    assert.equal(30, back[3])
    assert.equal("s3", back["3"])
    assert.equal("s1", back["1"])
    assert.equal(10, back[1])
  end)

  it("preserve shared references", function()
    local s = {"shared"}
    local back = rt({a = s, b = s, list = {s, s}})
    assert.equal(back.a, back.b)
    assert.equal(back.a, back.list[1])
    assert.equal(back.a, back.list[2])
    assert.same({"shared"}, back.a)
  end)

  it("preserve cycles, including through keys", function()
    local t = {}
    t.self = t
    t[t] = t
    t.child = {parent = t}
    local back = rt(t)
    assert.equal(back, back.self)
    assert.equal(back, back[back])
    assert.equal(back, back.child.parent)
  end)

  it("send a repeated long string once", function()
    local s = ("long and repeated "):rep(100)
    local one = #dumps({s})
    local many = #dumps({s, s, s, s, s, s, s, s})
    assert.is_true(many < one + 40, "8 copies took " .. many .. " bytes vs " .. one)
    local back = rt({s, s})
    assert.equal(s, back[1])
    assert.equal(s, back[2])
  end)

  it("carry big arrays of each kind", function()
    local ints, floats, strs, recs = {}, {}, {}, {}
    for i = 1, 20000 do
      ints[i] = i * 7919 - 50000
      floats[i] = i / 3
      strs[i] = "s" .. i
      recs[i] = {id = i, name = "user" .. i, tags = {"a", "b"}}
    end
    for _, t in ipairs({ints, floats, strs, recs}) do
      assert.is_true(same(t, rt(t)))
    end
  end)
end)

describe("codec slices (_core.dumpx with t, i, j: a Pool chunk's items and results)", function()
  local core = luamp._core
  local function rtx(...) return loads(core.dumpx(...), TRUSTED) end

  it("writes the table as the list of its items i..j, nils in place, nothing else", function()
    local t = setmetatable({10, 20, nil, 40, 50, x = "not sent", n = 5}, {__name = "M"})
    local r = rtx(t, nil, t, 2, 5)
    assert.is_nil(getmetatable(r))
    assert.is_nil(r.x); assert.is_nil(r.n)
    assert.equal(20, r[1]); assert.is_nil(r[2]); assert.equal(40, r[3]); assert.equal(50, r[4])
    assert.is_nil(r[5])
    assert.same({}, rtx(t, nil, t, 3, 2))
  end)

  it("inside another value, and met twice it is one table", function()
    local res = {1, {2}, "three", 4.5, true}
    local r = rtx({7, res, res, 9}, nil, res, 1, 4)
    assert.equal(r[2], r[3])
    assert.same({1, {2}, "three", 4.5}, r[2])
    assert.equal(9, r[4])
    -- other tables are written as usual
    local other = {1, 2, a = 3}
    assert.same({other, {1}}, rtx({other, res}, nil, res, 1, 1))
  end)

  it("reads the items as t[k] does (__index included)", function()
    local t = setmetatable({}, {__index = function(_, k) return k * 10 end})
    assert.same({20, 30, 40}, rtx(t, nil, t, 2, 4))
  end)

  it("names the item that cannot be sent, and refuses a bad range", function()
    local t = {1, 2, {f = io.stdout}}
    local e = H.raises("Serialize", core.dumpx, t, "items", t, 2, 3)
    assert.matches("items[2].f", tostring(e), 1, true)
    H.raises("Value", core.dumpx, t, nil, t, 3, 1)
    H.raises("Value", core.dumpx, t, nil, t, 1, math.maxinteger)
  end)
end)

describe("codec functions", function()
  it("carry upvalues", function()
    local base, name = 10, "n"
    local function f(x) return base + x, name end
    local g = rt(f)
    assert.are_not.equal(f, g)
    local r, n = g(5)
    assert.equal(15, r)
    assert.equal("n", n)
  end)

  it("keep an upvalue shared between closures shared", function()
    local function counter()
      local n = 0
      return {inc = function() n = n + 1 return n end, get = function() return n end}
    end
    local c = rt(counter())
    c.inc()
    c.inc()
    assert.equal(2, c.get())
    assert.equal(3, c.inc())
  end)

  it("carry recursive and mutually recursive local functions", function()
    local function fact(n) return n <= 1 and 1 or n * fact(n - 1) end
    assert.equal(720, rt(fact)(6))
    local even, odd
    function even(n) if n == 0 then return true end return odd(n - 1) end
    function odd(n) if n == 0 then return false end return even(n - 1) end
    local t = rt({even = even, odd = odd})
    assert.is_true(t.even(10))
    assert.is_false(t.odd(10))
    assert.is_false(t.even(7))
  end)

  it("bring along tables the function captures, with their sharing", function()
    local data = {1, 2, 3}
    local function sum() local s = 0 for _, v in ipairs(data) do s = s + v end return s end
    local t = rt({sum = sum, data = data})
    table.insert(t.data, 4)
    assert.equal(10, t.sum())
  end)

  it("keep file and line for errors and tracebacks", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local function boom() error("kaboom") end
    local g = rt(boom)
    local ok, err = pcall(g)
    assert.is_false(ok)
    assert.truthy(err:find("codec_spec.lua:" .. line .. ": kaboom", 1, true), err)
    local _, tb = xpcall(g, debug.traceback)
    assert.truthy(tb:find("codec_spec.lua:" .. line, 1, true), tb)
  end)

  it("bind _ENV to the receiver's globals", function()
    -- dump in this process, load and call in another one with different globals
    -- (busted runs specs in an environment of its own: give the function the real one)
    local globals = debug.getregistry()[2]
    local greet = load("return GREETING .. ' from ' .. type(luamp_codec_marker)", "=greet",
                       "t", globals)
    local file = os.tmpname()
    local f = assert(io.open(file, "wb"))
    f:write(dumps(greet))
    f:close()
    local script = H.script(([[
      local luamp = require "luamp"
      local f = assert(io.open(%q, "rb"))
      local g = luamp.loads(f:read("a"), {trusted = true})
      f:close()
      GREETING = "hello"
      luamp_codec_marker = {}
      io.write(g())
    ]]):format(file))
    local out, err, code = H.run({script})
    os.remove(file)
    os.remove(script)
    assert.equal(0, code, err)
    assert.equal("hello from table", out)
  end)

  it("send module functions and modules by name", function()
    assert.equal(string.format, rt(string.format))
    assert.equal(string, rt(string))
    assert.equal(luamp.getpid, rt(luamp.getpid))
    assert.equal(luamp, rt(luamp))
    assert.equal(print, rt(print))
    local t = rt({fmt = string.format, m = math, ins = table.insert})
    assert.equal(string.format, t.fmt)
    assert.equal(math, t.m)
    assert.equal(table.insert, t.ins)
  end)

  it("notice modules loaded after an earlier dumps", function()
    dumps({1, 2, 3})                       -- builds the name map
    local mod = {answer = function() return 42 end, data = {}}
    package.loaded["codec_spec_late_module"] = mod
    assert.equal(mod, rt(mod))
    assert.equal(mod.answer, rt(mod.answer))
    assert.equal(mod.data, rt({mod.data})[1])
    package.loaded["codec_spec_late_module"] = nil
  end)

  it("sends a user's global data by value, not by name", function()
    codec_spec_global_data = {1, 2, 3}
    local back = rt(codec_spec_global_data)
    assert.are_not.equal(codec_spec_global_data, back)
    assert.same({1, 2, 3}, back)
    codec_spec_global_data = nil
  end)
end)

describe("codec metatables", function()
  it("travel by value with their table", function()
    local Point = {}
    Point.__index = Point
    function Point.norm2(p) return p.x * p.x + p.y * p.y end
    local p = rt(setmetatable({x = 3, y = 4}, Point))
    assert.equal(25, p:norm2())
    local q = rt({setmetatable({x = 1, y = 1}, Point), setmetatable({x = 2, y = 0}, Point)})
    assert.equal(getmetatable(q[1]), getmetatable(q[2]))
  end)

  it("travel by name when they are a module's field", function()
    local mod = {}
    mod.Class = {__index = {hello = function() return "hi" end}}
    package.loaded["codec_spec_classes"] = mod
    local obj = rt(setmetatable({}, mod.Class))
    assert.equal(mod.Class, getmetatable(obj))
    assert.equal("hi", obj:hello())
    package.loaded["codec_spec_classes"] = nil
  end)
end)

describe("codec handles", function()
  local Thing = {}
  Thing.__index = Thing
  Thing.__luamp_handle = function(obj) return "spec.Thing", {id = obj.id} end
  local rebuilt = 0
  luamp._core.register_handle("spec.Thing", function(payload)
    rebuilt = rebuilt + 1
    return setmetatable({id = payload.id, rebuilt = true}, Thing)
  end)

  it("cross through the registered rebuild function", function()
    local obj = setmetatable({id = 7, secret = "not sent"}, Thing)
    local back = rt({obj = obj})
    assert.is_true(back.obj.rebuilt)
    assert.equal(7, back.obj.id)
    assert.is_nil(back.obj.secret)
  end)

  it("rebuild an object met twice once", function()
    local obj = setmetatable({id = 8}, Thing)
    local before = rebuilt
    local back = rt({obj, obj, {obj}})
    assert.equal(before + 1, rebuilt)
    assert.equal(back[1], back[2])
    assert.equal(back[1], back[3][1])
  end)

  it("raise Serialize for an unknown handle type", function()
    local Ghost = {__luamp_handle = function() return "spec.Ghost", 1 end}
    local s = dumps(setmetatable({}, Ghost))
    assert.truthy(serialize_error(loads, s, TRUSTED):find("unknown handle type 'spec.Ghost'", 1, true))
  end)

  it("raise Serialize with the path when the hook fails", function()
    local Bad = {__luamp_handle = function() error("hook broke") end}
    local msg = serialize_error(dumps, {x = setmetatable({}, Bad)})
    assert.truthy(msg:find("^value%.x: handle hook failed: .*hook broke"), msg)
  end)
end)

describe("codec errors", function()
  it("name the path to a coroutine", function()
    local args = {1, {handler = coroutine.create(print)}}
    assert.equal("value[2].handler: cannot send a coroutine", serialize_error(dumps, args))
  end)

  it("name the path to a foreign userdata", function()
    assert.equal("value.out: cannot send a userdata (FILE*)",
      serialize_error(dumps, {out = io.stdout}))
  end)

  it("refuse C functions that are not a loaded module's field", function()
    local msg = serialize_error(dumps, {cb = {coroutine.wrap(function() end)}})
    assert.equal("value.cb[1]: cannot send a C function that is not a field of a loaded module",
      msg)
  end)

  it("name table keys, metatables and upvalues in paths", function()
    local co = coroutine.create(print)
    assert.equal("value[<table>][1]: cannot send a coroutine",
      serialize_error(dumps, {[{}] = {co}}))
    assert.equal("value[key <coroutine>]: cannot send a coroutine",
      serialize_error(dumps, {[co] = 1}))
    assert.equal("value: cannot send a coroutine (inside its metatable)",
      serialize_error(dumps, setmetatable({}, {__index = co})))
    local function f() return co end
    assert.equal("upvalue 'co' of value.f: cannot send a coroutine", serialize_error(dumps, {f = f}))
    assert.equal('value["odd key"]: cannot send a coroutine',
      serialize_error(dumps, {["odd key"] = co}))
  end)

  it("limit nesting depth in both directions", function()
    local function nest(n)
      local t = {}
      for _ = 2, n do t = {t} end
      return t
    end
    assert.is_true(same(nest(200), rt(nest(200))))
    assert.truthy(serialize_error(dumps, nest(201)):find("too deeply nested"))
    -- a hand-made encoding 100000 tables deep
    local deep = "\1" .. ("\9\1\0"):rep(100000) .. ("\0")
    assert.truthy(serialize_error(loads, deep):find("too deeply nested"))
  end)

  it("leave the state usable after a failed dumps", function()
    for _ = 1, 3 do serialize_error(dumps, {1, 2, coroutine.create(print)}) end
    assert.same({1, 2, {3}}, rt({1, 2, {3}}))
  end)
end)

describe("codec input checks", function()
  local samples = {
    {1, 2.5, "s", true, {nested = {1, 2}}},
    {id = 1, name = "user1", score = 1.5, tags = {"a", "b"}},
    setmetatable({x = 1}, {__index = {y = 2}}),
    {("long string "):rep(10), ("long string "):rep(10), string, _G},
  }

  it("reject a wrong version, empty input and trailing bytes", function()
    assert.truthy(serialize_error(loads, ""):find("empty input"))
    assert.truthy(serialize_error(loads, "\99\0"):find("unsupported format version 99"))
    assert.truthy(serialize_error(loads, dumps(1) .. "x"):find("trailing bytes"))
  end)

  it("reject every truncated prefix", function()
    for _, v in ipairs(samples) do
      local s = dumps(v)
      for n = 0, #s - 1 do
        local ok, err = pcall(loads, s:sub(1, n), TRUSTED)
        assert.is_false(ok)
        assert.equal("Serialize", err.kind)
      end
    end
    local f = dumps(function() return 1 end)
    for n = 0, #f - 1, 7 do H.raises("Serialize", loads, f:sub(1, n), TRUSTED) end
  end)

  it("survive random bytes and corrupted encodings", function()
    math.randomseed(20240611)
    local function check(s)
      local ok, err = pcall(loads, s, {trusted = false})
      assert.is_true(ok or err.kind == "Serialize", tostring(err))
    end
    for _ = 1, 3000 do
      local n = math.random(0, 64)
      local b = {}
      for i = 1, n do b[i] = string.char(math.random(0, 255)) end
      check(table.concat(b))
      check("\1" .. table.concat(b))
    end
    for _, v in ipairs(samples) do
      local s = dumps(v)
      for _ = 1, 500 do
        local i = math.random(1, #s)
        check(s:sub(1, i - 1) .. string.char(math.random(0, 255)) .. s:sub(i + 1))
      end
    end
  end)

  it("bound what nested size claims preallocate", function()
    -- 20 nested tables each claiming 100000 elements, backed by 100 KB of input: a
    -- handle at the bottom measures the heap while all 20 are allocated
    local grew, probed
    luamp._core.register_handle("spec.Probe", function()
      grew, probed = collectgarbage("count") - grew, true
      return {}
    end)
    local claim = "\9\160\141\6\0"                     -- table, 100000 array items
    local s = "\1" .. claim:rep(20) .. "\15\10spec.Probe\128" .. dumps(("p"):rep(100000))
    collectgarbage()
    collectgarbage("stop")
    grew = collectgarbage("count")
    H.raises("Serialize", loads, s, TRUSTED)
    collectgarbage("restart")
    assert.is_true(probed)
    assert.is_true(grew < 8 * 1024, "preallocated " .. grew .. " KB")
  end)

  it("refuse absurd lengths before allocating", function()
    -- a string, a table and a function each claiming far more than the input holds
    for _, s in ipairs({"\1\8\255\255\255\255\255\255\255\255\127",
                        "\1\9\255\255\255\255\15\0", "\1\9\0\255\255\255\255\15",
                        "\1\12\255\255\255\255\15\0"}) do
      assert.truthy(serialize_error(loads, s, TRUSTED):find("exceeds input"))
    end
    H.raises("Serialize", loads, "\1\11\0")            -- reference to nothing
    H.raises("Serialize", loads, "\1\9\0\1\0\5")       -- nil key
  end)
end)


describe("codec untrusted mode", function()
  -- What an untrusted decode (luamp.loads without {trusted = true}) refuses: the message
  -- it gives, checked against both the default and an explicit trusted = false.
  local function refused(s, what)
    for _, opts in ipairs({{}, {trusted = false}}) do
      local msg = serialize_error(loads, s, opts)
      assert.truthy(msg:find(what .. " not accepted from an untrusted peer", 1, true), msg)
    end
    assert.truthy(serialize_error(loads, s):find(what, 1, true))
  end

  it("is the default of luamp.loads", function()
    local s = dumps({f = function() return 1 end})
    refused(s, "functions are")
    assert.equal(1, loads(s, {trusted = true}).f())
  end)

  it("takes trusted as a boolean only", function()
    assert.equal("x", loads(dumps("x"), {trusted = false}))
    H.raises("Value", loads, dumps("x"), {trusted = "yes"})
    H.raises("Value", loads, dumps("x"), {trusted = 1})
  end)

  it("accepts plain data, metatables by value included", function()
    local v = {1, "two", {three = 3.0}, [true] = 0 / 0, setmetatable({}, {__index = {y = 2}})}
    local back = loads(dumps(v))
    assert.is_true(same(v, back))
    assert.equal(2, back[4].y)
  end)

  -- Each object below crosses (trusted) as the receiver's own live object; untrusted,
  -- the bytes a trusted dumps made of it are refused, and trusted they still work.
  local globals = debug.getregistry()[2]
  local live = {
    {"the global table", globals, "the global table is"},
    {"package.loaded", package.loaded, "modules and their fields are"},
    {"a module table", string, "modules and their fields are"},
    {"a module's table field", luamp.errors, "modules and their fields are"},
    {"a module function", string.format, "modules and their fields are"},
    {"luamp's error metatable", getmetatable(luamp._core.error("Value", "x")),
     "modules and their fields are"},
  }
  for _, case in ipairs(live) do
    local name, obj, what = case[1], case[2], case[3]
    it("refuses " .. name, function()
      local s = dumps(obj)
      refused(s, what)
      refused(dumps({nested = {obj}}), what)
      assert.equal(obj, loads(s, {trusted = true}))
    end)
  end

  it("refuses a luamp error object (its metatable is luamp's own)", function()
    local ok, err = pcall(luamp._core.raise, "Value", "boom")
    assert.is_false(ok)
    refused(dumps(err), "modules and their fields are")
    local back = loads(dumps(err), {trusted = true})
    assert.equal("luamp.Value: boom", tostring(back))
  end)

  it("refuses handles before rebuilding anything", function()
    local handles = debug.getregistry()["luamp.handles"]
    local objects = {Lock = luamp.Lock(), Queue = luamp.Queue(), Event = luamp.Event(),
                     Value = luamp.Value("i", 1)}
    for kind, obj in pairs(objects) do
      local tname = "luamp." .. kind
      local real, calls = handles[tname], 0
      handles[tname] = function(...) calls = calls + 1; return real(...) end
      local ok, err = pcall(function()
        refused(dumps(obj), "handles (luamp objects) are")
        refused(dumps({inner = {obj}}), "handles (luamp objects) are")
      end)
      handles[tname] = real
      assert(ok, err)
      assert.equal(0, calls, tname .. " was rebuilt")
      assert.is_not_nil(loads(dumps(obj), {trusted = true}))
    end
  end)

  it("refuses hand-made bytes of each live tag", function()
    local function named(mod, field)
      local f = field and (string.char(#field + 1) .. field) or "\0"
      return "\1\14" .. string.char(#mod) .. mod .. f
    end
    refused("\1\13", "the global table is")
    refused(named("_G"), "modules and their fields are")
    refused(named("package", "loaded"), "modules and their fields are")
    refused(named("luamp._core", "error_mt"), "modules and their fields are")
    refused(named("io", "stdout"), "modules and their fields are")
    refused(named("os", "execute"), "modules and their fields are")
    -- a forged Lock handle naming another process's descriptor (pid 1, fd 0): trusted,
    -- the rebuild would open /proc/1/fd/0; untrusted it is never called
    local handles = debug.getregistry()["luamp.handles"]
    local real, calls = handles["luamp.Lock"], 0
    handles["luamp.Lock"] = function() calls = calls + 1 end
    local forged = "\1\15\10luamp.Lock" .. dumps({arena = ("0"):rep(32), pid = 1, fd = 0, off = 64}):sub(2)
    local ok, err = pcall(refused, forged, "handles (luamp objects) are")
    loads(forged, {trusted = true})                 -- the spy shows the bytes reach it
    handles["luamp.Lock"] = real
    assert(ok, err)
    assert.equal(1, calls)
    -- a handle of a type nobody registered, and a table whose metatable is a named one
    refused("\1\15\5ghost\0", "handles (luamp objects) are")
    refused("\1\10\0\0" .. named("luamp._core", "error_mt"):sub(2), "modules and their fields are")
  end)

  it("does not require modules, even trusted ones it refuses", function()
    package.loaded["codec_spec_unloaded"] = {x = 1}
    local s = dumps(package.loaded["codec_spec_unloaded"])
    package.loaded["codec_spec_unloaded"] = nil
    refused(s, "modules and their fields are")
    assert.is_nil(package.loaded["codec_spec_unloaded"])
    -- trusted: require is called, and fails here as there is no such module file
    assert.truthy(serialize_error(loads, s, {trusted = true}):find("cannot require 'codec_spec_unloaded'"))
  end)

  it("never crashes on corrupt function bytes (default and trusted = false)", function()
    -- in a child process, so that a crash fails this test instead of the whole run:
    -- bytecode with bytes changed after the function tag; trusted, Lua would load it
    -- (it does not verify bytecode) and calling it crashes
    local script = H.script([[
      local luamp = require "luamp"
      local up = {1, 2}
      local function f(a, b)
        local t = {}
        for i = 1, a do t[i] = up[i % 2 + 1] * b end
        return t, string.format("%d", a)
      end
      local s = luamp.dumps(f)
      math.randomseed(7)
      local refused = 0
      for i = 1, 3000 do
        local j = math.random(3, #s)
        local m = s:sub(1, j - 1) .. string.char(math.random(0, 255)) .. s:sub(j + 1)
        local ok, v = pcall(luamp.loads, m, i % 2 == 0 and {trusted = false} or nil)
        if ok and type(v) == "function" then pcall(v, 3, 2) end
        if ok or v.kind ~= "Serialize" then os.exit(3) end
        refused = refused + 1
      end
      io.write(refused)
    ]])
    local out, err, code = H.run({script})
    os.remove(script)
    assert.equal(0, code, err)
    assert.equal("3000", out)
  end)
end)
