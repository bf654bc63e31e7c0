-- Value, Array and SharedMemory: typecodes, range checks, atomic updates, and sharing
-- with forked (and exec'd) processes.
local H = require "helper"
local luamp = H.luamp

local function run(fn, ...)
  local p = luamp.Process{target = fn, args = table.pack(...)}
  p:start()
  p:join(20)
  return p.exitcode
end

local function shm_exists(name)
  local f = io.open("/dev/shm/" .. name, "rb")
  if f then f:close() end
  return f ~= nil
end

describe("Value", function()
  it("holds a typed number, readable and writable as .value", function()
    local v = luamp.Value("d", 0.0)
    assert.equal("<Value d 0.0>", tostring(v))
    v.value = v.value + 1.5
    assert.equal(1.5, v.value)
    assert.equal("<Value d 1.5>", tostring(v))
    assert.equal("d", v.typecode)
    local i = luamp.Value("i", 7)
    assert.equal(7, i.value)
    assert.equal("integer", math.type(i.value))
    assert.equal(0, luamp.Value("q").value)
  end)

  it("reads .value under any equal key, also one built at run time after a collection", function()
    local v = luamp.Value("i", 41)
    collectgarbage(); collectgarbage()
    local key = ("VALUE"):lower()
    assert.equal(41, v[key])
    v[key] = v[key] + 1
    assert.equal(42, v.value)
    assert.is_nil(v[1])
    assert.is_nil(v.values)
    assert.is_nil(v[true])
    assert.equal("function", type(v.get_lock))
    H.raises("Value", function() v[1] = 2 end)
    H.raises("Value", function() v.Value = 2 end)
    assert.equal(42, v.value)
  end)

  it("accepts every typecode and readable names", function()
    for _, code in ipairs {"b", "B", "h", "H", "i", "I", "l", "L", "q", "Q", "f", "d"} do
      local v = luamp.Value(code, 1)
      assert.equal(1, v.value)
      assert.equal(code, v.typecode)
    end
    local names = {int = "i", uint = "I", double = "d", float = "f", char = "b", byte = "b",
                   ubyte = "B", short = "h", ushort = "H", long = "l", ulong = "L",
                   longlong = "q", ulonglong = "Q", int8 = "b", uint8 = "B", int16 = "h",
                   uint16 = "H", int32 = "i", uint32 = "I", int64 = "q", uint64 = "Q"}
    for name, code in pairs(names) do
      assert.equal(code, luamp.Value(name).typecode, name)
    end
    H.raises("Value", luamp.Value, "x", 1)
    H.raises("Value", luamp.Value, "", 1)
    H.raises("Value", luamp.Value, "ii", 1)
    H.raises("Value", luamp.Value, 5, 1)
    H.raises("Value", luamp.Value, nil, 1)
  end)

  it("checks that values fit the typecode", function()
    local ranges = {
      b = {-128, 127}, B = {0, 255}, h = {-32768, 32767}, H = {0, 65535},
      i = {-2147483648, 2147483647}, I = {0, 4294967295},
      q = {math.mininteger, math.maxinteger}, Q = {0, math.maxinteger},
    }
    for code, r in pairs(ranges) do
      local v = luamp.Value(code, r[1])
      assert.equal(r[1], v.value)
      v.value = r[2]
      assert.equal(r[2], v.value)
      if r[1] > math.mininteger then
        H.raises("Value", function() v.value = r[1] - 1 end)
      end
      if r[2] < math.maxinteger then
        H.raises("Value", function() v.value = r[2] + 1 end)
      end
      assert.equal(r[2], v.value)          -- a refused store changes nothing
    end
    local b = luamp.Value("b", 0)
    local e = H.raises("Value", function() b.value = 300 end)
    assert.truthy(e.message:match("300"))
    H.raises("Value", luamp.Value, "b", 128)
    H.raises("Value", luamp.Value, "i", 1.5)
    H.raises("Value", function() b.value = "1" end)
    H.raises("Value", function() b.value = true end)
    H.raises("Value", function() b.value = nil end)
    b.value = 3.0                            -- an integral float is fine
    assert.equal(3, b.value)
    H.raises("Value", function() b.other = 1 end)
  end)

  it("stores floats, with 'f' rounding and range-checking", function()
    local f = luamp.Value("f", 0.1)
    assert.is_true(math.abs(f.value - 0.1) < 1e-7)
    assert.are_not.equal(0.1, f.value)
    H.raises("Value", function() f.value = 1e300 end)
    f.value = math.huge
    assert.equal(math.huge, f.value)
    local d = luamp.Value("d", 0.1)
    assert.equal(0.1, d.value)
    d.value = 0 / 0
    assert.is_true(d.value ~= d.value)
    d.value = 3                               -- integers become floats
    assert.equal("float", math.type(d.value))
  end)

  it("add and cas update atomically and check ranges", function()
    local v = luamp.Value("i", 10)
    assert.equal(15, v:add(5))
    assert.equal(12, v:add(-3))
    assert.is_true(v:cas(12, 20))
    assert.is_false(v:cas(12, 30))
    assert.equal(20, v.value)
    local b = luamp.Value("B", 250)
    H.raises("Value", b.add, b, 6)
    assert.equal(250, b.value)
    H.raises("Value", b.add, b, "1")
    H.raises("Value", b.cas, b, 250, 256)
    local d = luamp.Value("d", 1)
    assert.equal(3.5, d:add(2.5))
    assert.is_true(d:cas(3.5, 0))
    assert.equal(0.0, d.value)
    local q = luamp.Value("q", math.maxinteger)
    H.raises("Value", q.add, q, 1)
  end)

  -- the counters' fast paths (signed 4- and 8-byte integers) keep every check of the
  -- general one
  it("keeps the range checks of 'i' and 'q' at their limits", function()
    local i = luamp.Value("i", 2147483646, {lock = false})
    assert.equal(2147483647, i:add(1))
    H.raises("Value", i.add, i, 1)
    assert.equal(2147483647, i.value)
    assert.equal(-2147483648, i:add(-4294967295))
    H.raises("Value", i.add, i, -1)
    H.raises("Value", i.add, i, math.mininteger)
    assert.equal(-2147483648, i.value)
    H.raises("Value", function() i.value = 2147483648 end)
    H.raises("Value", function() i.value = -2147483649 end)
    i.value = -2147483648
    assert.equal(-2147483648, i.value)
    assert.equal(-2147483646, i:add(2.0))       -- an integral float adds as the general path does
    H.raises("Value", i.add, i, 0.5)
    H.raises("Value", i.add, i, "1")
    assert.equal(-2147483646, i.value)
    assert.equal("integer", math.type(i.value))
    local q = luamp.Value("q", math.mininteger + 1)
    assert.equal(math.mininteger, q:add(-1))
    H.raises("Value", q.add, q, -1)
    assert.equal(math.mininteger, q.value)
    q.value = math.maxinteger
    assert.equal(math.maxinteger, q.value)
    assert.equal(-1, q:add(math.mininteger))
  end)

  it("has an RLock by default, none with {lock = false}, or the one given", function()
    local v = luamp.Value("i", 0)
    assert.truthy(tostring(v:get_lock()):match("^<RLock"))
    assert.equal(v:get_lock(), v:get_lock())
    local n = luamp.Value("i", 0, {lock = false})
    H.raises("Value", n.get_lock, n)
    local l = luamp.Lock()
    assert.equal(l, luamp.Value("i", 0, {lock = l}):get_lock())
    assert.equal(l, luamp.Array("i", 3, {lock = l}):get_lock())
    H.raises("Value", luamp.Value, "i", 0, {lock = 1})
    H.raises("Value", luamp.Value, "i", 0, {lok = true})
    H.raises("Value", luamp.Value, "i", 0, "yes")
  end)

  it("is shared with child processes", function()
    local v = luamp.Value("d", 0.0)
    assert.equal(0, run(function() v.value = 3.1415927 end))
    assert.equal(3.1415927, v.value)
  end)

  it("add from several processes loses nothing", function()
    local v = luamp.Value("q", 0, {lock = false})
    local ps = {}
    for i = 1, 4 do
      ps[i] = luamp.Process{target = function() for _ = 1, 2000 do v:add(1) end end}
      ps[i]:start()
    end
    for i = 1, 4 do ps[i]:join(20); assert.equal(0, ps[i].exitcode) end
    assert.equal(8000, v.value)
  end)

  it("compound updates are exact under get_lock()", function()
    local v = luamp.Value("i", 0)
    local ps = {}
    for i = 1, 4 do
      ps[i] = luamp.Process{target = function()
        for _ = 1, 500 do
          v:get_lock():with(function() v.value = v.value + 1 end)
        end
      end}
      ps[i]:start()
    end
    for i = 1, 4 do ps[i]:join(20); assert.equal(0, ps[i].exitcode) end
    assert.equal(2000, v.value)
  end)

  it("closes", function()
    local v = luamp.Value("i", 1)
    v:close(); v:close()
    assert.equal("<Value closed>", tostring(v))
    H.raises("Value", function() return v.value end)
    H.raises("Value", function() v.value = 1 end)
    H.raises("Value", v.add, v, 1)
    H.raises("Value", v.get_lock, v)
  end)
end)

describe("Array", function()
  it("is 1-based, with #, totable and pairs", function()
    local a = luamp.Array("i", {1, 2, 3})
    assert.equal("<Array i size=3>", tostring(a))
    assert.equal(3, #a)
    assert.equal(1, a[1]); assert.equal(3, a[3])
    a[1], a[2] = a[2], a[1]
    assert.same({2, 1, 3}, a:totable())
    assert.same({1, 3}, a:totable(2))
    assert.same({2, 1}, a:totable(1, 2))
    assert.same({}, a:totable(3, 2))
    local seen = {}
    for i, x in pairs(a) do seen[i] = x end
    assert.same({2, 1, 3}, seen)
    assert.equal("i", a.typecode)
    assert.is_nil(a.nonexistent)
  end)

  it("can be zero-filled, or empty", function()
    local d = luamp.Array("d", 1000)
    assert.equal(1000, #d)
    assert.equal(0.0, d[1000])
    assert.equal(0, #luamp.Array("b", 0))
    assert.same({}, luamp.Array("b", {}):totable())
  end)

  it("comes zeroed even in memory a freed array used", function()
    local a = luamp.Array("d", 300000)     -- big enough that its pages are given back
    for i = 1, #a, 1000 do a[i] = i end
    a[#a] = 5
    a = nil
    collectgarbage(); collectgarbage()
    local b = luamp.Array("d", 300000)
    for i = 1, #b, 997 do assert.equal(0.0, b[i]) end
    assert.equal(0.0, b[#b])
    local small = luamp.Array("q", {7, 7, 7})
    small = nil
    collectgarbage(); collectgarbage()
    assert.same({0, 0, 0}, luamp.Array("q", 3):totable())
    H.raises("Value", luamp.Array, "d", 1 << 36)   -- more than the arena holds
  end)

  it("iterates with ipairs to its end and no further", function()
    local a = luamp.Array("i", {5, 6, 7})
    local seen = {}
    for i, v in ipairs(a) do seen[i] = v end
    assert.same({5, 6, 7}, seen)
    local empty = luamp.Array("d", 0)
    for _ in ipairs(empty) do error("an empty Array has no elements") end
  end)

  it("raises Value for bad indices, elements, sizes and typecodes", function()
    local a = luamp.Array("b", 3)
    for _, k in ipairs {0, 5, -1, 1.5, math.maxinteger} do
      H.raises("Value", function() return a[k] end)
      H.raises("Value", function() a[k] = 1 end)
    end
    -- a[#a + 1] reads nil (the border ipairs stops at) but cannot be written
    assert.is_nil(a[4])
    H.raises("Value", function() a[4] = 1 end)
    H.raises("Value", function() return a[{}] end)
    H.raises("Value", function() a.x = 1 end)
    H.raises("Value", function() a[1] = 128 end)
    H.raises("Value", function() a[1] = "1" end)
    H.raises("Value", luamp.Array, "b", {1, 2, 300})
    H.raises("Value", luamp.Array, "i", {1, "x"})
    H.raises("Value", luamp.Array, "i", -1)
    H.raises("Value", luamp.Array, "i", 1.5)
    H.raises("Value", luamp.Array, "i", "10")
    H.raises("Value", luamp.Array, "z", 3)
    H.raises("Value", luamp.Array, "d", 1 << 50)
    a[2.0] = 5                                -- an integral float index is fine
    assert.equal(5, a[2])
  end)

  it("is shared with a child that negates it (the seeds' example)", function()
    local num = luamp.Value("d", 0.0)
    local arr = luamp.Array("i", {0, 1, 2, 3, 4, 5, 6, 7, 8, 9})
    assert.equal(0, run(function(n, a)
      n.value = 3.1415927
      for i = 1, #a do a[i] = -a[i] end
    end, num, arr))
    assert.equal(3.1415927, num.value)
    assert.same({0, -1, -2, -3, -4, -5, -6, -7, -8, -9}, arr:totable())
  end)

  it("closes", function()
    local a = luamp.Array("i", 2)
    a:close()
    assert.equal("<Array closed>", tostring(a))
    H.raises("Value", function() return a[1] end)
    H.raises("Value", function() return #a end)
    H.raises("Value", a.totable, a)
  end)
end)

describe("Value and Array handles", function()
  local function handle(obj)
    local name, payload = getmetatable(obj).__luamp_handle(obj)
    return debug.getregistry()["luamp.handles"][name], payload
  end

  it("rebuild onto the same memory, with the same lock", function()
    local v = luamp.Value("h", 5)
    local rebuild, payload = handle(v)
    local v2 = rebuild(payload)
    v2.value = -7
    assert.equal(-7, v.value)
    assert.equal(v:get_lock(), v2:get_lock())
    local a = luamp.Array("d", {1.5, 2.5})
    local rebuild_a, pa = handle(a)
    local a2 = rebuild_a(pa)
    assert.equal(2, #a2)
    a2[2] = 9
    assert.equal(9.0, a[2])
    H.raises("Value", rebuild, pa)          -- an Array is not a Value
    H.raises("Value", rebuild, {core = pa.core, lock = 5})
  end)

  it("cross the codec, with their lock", function()
    local v = luamp.Value("i", 3)
    local a = luamp.Array("b", {1, -1})
    local t = luamp.loads(luamp.dumps({v = v, a = a, none = luamp.Value("d", 1, {lock = false})}),
      {trusted = true})
    t.v.value = 9
    assert.equal(9, v.value)
    v:get_lock():acquire()
    assert.truthy(tostring(t.v:get_lock()):match("locked=true"))
    v:get_lock():release()
    assert.same({1, -1}, t.a:totable())
    H.raises("Value", t.none.get_lock, t.none)
    local msg = luamp.dumps(a)
    assert.equal(0, run(function() local b = luamp.loads(msg, {trusted = true}); b[1] = 100 end))
    assert.equal(100, a[1])
  end)

  it("let an exec'd process change a Value", function()
    local v = luamp.Value("i", 1, {lock = false})
    local _, p = handle(v)
    local script = H.script(string.format([[
      local luamp = require "luamp"
      local _ = luamp.Value     -- the part that registers the handle type loads on first use
      local rebuild = debug.getregistry()["luamp.handles"]["luamp.Value"]
      local v = rebuild{core = {arena = %q, pid = %d, fd = %d, off = %d, gen = %d}, lock = false}
      io.write(v.value)
      v.value = 42
    ]], p.core.arena, p.core.pid, p.core.fd, p.core.off, p.core.gen))
    local out, err, code = H.run({script})
    os.remove(script)
    assert.equal(0, code, err)
    assert.equal("1", out)
    assert.equal(42, v.value)
  end)
end)

describe("SharedMemory", function()
  local name = "luamp_spec_" .. luamp.getpid()

  after_each(function()
    pcall(function() luamp.SharedMemory(name):unlink() end)
  end)

  it("creates, reads and writes with 1-based positions, attaches by name, unlinks", function()
    local shm = luamp.SharedMemory{name = name, create = true, size = 64}
    assert.equal(name, shm.name)
    assert.equal(64, shm.size)
    assert.equal(("<SharedMemory name=%s size=64>"):format(name), tostring(shm))
    assert.equal(string.rep("\0", 64), shm:read())
    shm:write(1, "hello")
    shm:write(60, "world")
    assert.equal("hello", shm:read(1, 5))
    assert.equal("world", shm:read(60, 5))
    assert.equal("world", shm:read(-5))
    assert.equal("d", shm:read(-1, 1))
    assert.equal("", shm:read(65, 0))
    local other = luamp.SharedMemory(name)
    assert.equal(64, other.size)
    assert.equal("hello", other:read(1, 5))
    other:write(2, "a")
    assert.equal("hallo", shm:read(1, 5))
    assert.is_true(shm_exists(name))
    shm:unlink()
    assert.is_false(shm_exists(name))
    assert.equal("hallo", other:read(1, 5))     -- mappings outlive the name
    H.raises("NotFound", shm.unlink, shm)
    shm:close(); other:close()
  end)

  it("raises Value for out-of-bounds reads and writes", function()
    local shm = luamp.SharedMemory{name = name, create = true, size = 8}
    H.raises("Value", shm.read, shm, 0, 1)
    H.raises("Value", shm.read, shm, 9, 1)
    H.raises("Value", shm.read, shm, 1, 9)
    H.raises("Value", shm.read, shm, 1, -1)
    H.raises("Value", shm.read, shm, -9)
    H.raises("Value", shm.write, shm, 8, "ab")
    H.raises("Value", shm.write, shm, 0, "a")
    shm:write(8, "z")
    shm:write(9, "")
    assert.equal("z", shm:read(8))
    shm:close()
  end)

  it("refuses an existing name on create, a missing one on attach, and bad sizes", function()
    local shm = luamp.SharedMemory{name = name, create = true, size = 8}
    H.raises("Value", luamp.SharedMemory, {name = name, create = true, size = 8})
    H.raises("NotFound", luamp.SharedMemory, "luamp_spec_missing_" .. luamp.getpid())
    H.raises("Value", luamp.SharedMemory, {name = name .. "x", create = true, size = 0})
    H.raises("Value", luamp.SharedMemory, {name = name .. "x", create = true})
    H.raises("Value", luamp.SharedMemory, {name = "a/b", create = true, size = 8})
    H.raises("Value", luamp.SharedMemory, {name = "", create = true, size = 8})
    H.raises("Value", luamp.SharedMemory, {name = name, bogus = 1})
    H.raises("Value", luamp.SharedMemory, {create = false})
    shm:close()
  end)

  it("makes up a name when none is given", function()
    local shm = luamp.SharedMemory{create = true, size = 16}
    assert.truthy(shm.name:match("^luamp_"))
    assert.is_true(shm_exists(shm.name))
    shm:unlink()
    assert.is_false(shm_exists(shm.name))
  end)

  it("is shared with a child process, and crosses as a handle by name", function()
    local shm = luamp.SharedMemory{name = name, create = true, size = 16}
    assert.equal(0, run(function() shm:write(1, "from the child") end))
    assert.equal("from the child", shm:read(1, 14))
    local hname, payload = getmetatable(shm).__luamp_handle(shm)
    local copy = debug.getregistry()["luamp.handles"][hname](payload)
    assert.equal("from the child", copy:read(1, 14))
    copy:close()
    local decoded = luamp.loads(luamp.dumps(shm), {trusted = true})
    assert.equal(name, decoded.name)
    assert.equal("from the child", decoded:read(1, 14))
    decoded:close()
    shm:close()
  end)

  it("closing makes methods raise Value; unlink still works", function()
    local shm = luamp.SharedMemory{name = name, create = true, size = 8}
    shm:close(); shm:close()
    assert.is_true(shm.closed)
    H.raises("Value", shm.read, shm)
    H.raises("Value", shm.write, shm, 1, "x")
    assert.equal(name, shm.name)
    shm:unlink()
    assert.is_false(shm_exists(name))
  end)
end)
