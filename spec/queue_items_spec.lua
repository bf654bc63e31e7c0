-- A queue's put writes a plain value (nil, boolean, number, string) straight from the Lua
-- value into the record, and its get pushes a string without the decoder (queue.c,
-- codec.c's luamp_encode_plain and luamp_decoded_string). These must give exactly the
-- bytes and values the codec gives, at every length where the encoding changes shape.
local H = require "helper"
local luamp = H.luamp

-- lengths around the encoding's steps: short strings (< 64) carry their length in the
-- tag, longer ones a varint (1, 2, 3 bytes); past 32 KiB an item goes to an extent
local lengths = {0, 1, 7, 8, 16, 17, 31, 32, 63, 64, 127, 128, 1024, 16383, 16384,
                 32760, 32764, 32765, 32766, 32767, 32768, 40000, 1 << 20}

local function sample(n)
  local t = {}
  for i = 1, n % 251 do t[i] = string.char((i * 37) % 256) end   -- zeros and high bytes too
  return (table.concat(t) .. string.rep("\0\255x", n)):sub(1, n)
end

describe("Queue items", function()
  it("writes a plain value as the same bytes the codec does", function()
    local q = luamp.Queue()
    local values = {false, true, 0, 1, 127, 128, -1, -128, -129, 32767, -32769, 1 << 31,
                    math.maxinteger, math.mininteger, 0.5, -0.0, 1 / 0, -1 / 0, 2 ^ 53}
    for _, n in ipairs(lengths) do values[#values + 1] = sample(n) end
    for _, v in ipairs(values) do
      q:put(v)
      assert.equal(luamp.dumps(v), q:_get_raw())
    end
    q:put(nil)
    assert.equal(luamp.dumps(nil), q:_get_raw())
    q:put(0 / 0)
    assert.equal(luamp.dumps(0 / 0), q:_get_raw())
  end)

  it("gives back strings of every length intact, from another process, in order", function()
    local q = luamp.Queue()
    local p = H.start(function()
      for _, n in ipairs(lengths) do q:put(sample(n)) end
      q:put("end")
    end)
    for _, n in ipairs(lengths) do
      local s = q:get()
      assert.equal("string", type(s))
      assert.equal(n, #s)
      assert.is_true(s == sample(n), "length " .. n)
    end
    assert.equal("end", q:get())
    p:join()
  end)

  it("decodes a string record whose length is padded as the decoder does", function()
    local q = luamp.Queue()
    q:_put_raw("\1\8\133\128\0hello")        -- T_STR, varint 5 with redundant bytes
    assert.equal("hello", q:get())
    q:_put_raw("\1\8\128\0")                  -- an empty string the same way
    assert.equal("", q:get())
  end)

  it("raises for a string record that claims more or fewer bytes than it has", function()
    local q = luamp.Queue()
    local bad = {
      "\1\72abc",                  -- a short string of 8 bytes with 3
      "\1\67abcdef",               -- a short string of 3 bytes with 6
      "\1\8\10abc",                -- T_STR of 10 bytes with 3
      "\1\8\2abc",                 -- T_STR of 2 bytes with 3
      "\1\8\255\255\255\255\255\255\255\255\255\127",   -- a varint past 64 bits
      "\1\8",                      -- no length at all
      "\2\67abc",                  -- another format version
    }
    for _, b in ipairs(bad) do
      q:_put_raw(b)
      local ok, e = pcall(q.get, q)
      assert.is_false(ok, ("%q gave %s"):format(b, tostring(e)))
      assert.equal("Serialize", type(e) == "table" and e.kind, tostring(e))
    end
    q:put("still fine")
    assert.equal("still fine", q:get())
  end)
end)
