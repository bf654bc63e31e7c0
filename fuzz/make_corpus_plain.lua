-- Writes the seeds of fuzz_plain into fuzz/corpus_plain/: byte 0 says who reads (even: a
-- server reads a request, odd: a client reads a reply), the rest is a vector's count and
-- values (fuzz/fuzz_plain.c puts VEC_TAG in front). Run: lua5.4 fuzz/make_corpus_plain.lua
local dir = arg[1] or "fuzz/corpus_plain"

local function int(i) return "i" .. string.pack("<i8", i) end
local function num(d) return "d" .. string.pack("<d", d) end
local function str(s) return "s" .. string.pack("<I8", #s) .. s end

local function seed(name, reader, count, body)
  local f = assert(io.open(dir .. "/" .. name, "wb"))
  f:write(string.char(reader, count), body)
  f:close()
end

local SERVER, CLIENT = 0, 1
-- requests as proxies send them: d[k] = v, q:put(1), a call with every kind of value
seed("request_setitem", SERVER, 4, int(3) .. str("__setitem__") .. str("k") .. str("value"))
seed("request_put", SERVER, 3, int(9) .. str("put") .. int(1))
seed("request_kinds", SERVER, 9, int(1) .. str("m") .. "n" .. "t" .. "f" ..
  num(-0.0) .. num(0 / 0) .. int(math.mininteger) .. str("a\0b"))
seed("request_no_args", SERVER, 2, int(0) .. str(""))
-- replies: nothing, one value, special floats, many nils (the largest count)
seed("reply_empty", CLIENT, 0, "")
seed("reply_one", CLIENT, 1, str(("x"):rep(300)))
seed("reply_floats", CLIENT, 4, num(1 / 0) .. num(-1 / 0) .. num(2.5) .. num(-0.0))
seed("reply_max", CLIENT, 250, ("n"):rep(250))
-- refused: one value short, a string longer than the frame, a byte after the values,
-- a count over the limit, an unknown tag, a request without its method
seed("bad_short", SERVER, 3, int(1) .. str("m"))
seed("bad_strlen", CLIENT, 1, "s" .. string.pack("<I8", 1 << 62) .. "abc")
seed("bad_trailing", CLIENT, 1, "t" .. "t")
seed("bad_count", CLIENT, 251, ("n"):rep(251))
seed("bad_tag", SERVER, 2, int(1) .. "x")
seed("bad_no_method", SERVER, 1, int(1))
