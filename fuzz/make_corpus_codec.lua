-- Writes the seed corpus for fuzz_codec into fuzz/corpus_codec/: encodings of sample
-- values covering every tag. Run: LUA_CPATH='build/?.so' lua5.4 fuzz/make_corpus_codec.lua
local luamp = require "luamp"
local core = luamp._core
local dir = arg[1] or "fuzz/corpus_codec"
os.execute("mkdir -p " .. dir)

local mt = {}
mt.__luamp_handle = function(o) return "fuzz", o.payload end
core.register_handle("fuzz", function(p) return setmetatable({payload = p}, mt) end)

local shared = {"shared"}
local cyc = {}; cyc.self = cyc
local samples = {
  nil, true, false, 0, 1, 127, 128, -1, -129, 40000, -40000, 2^31, math.maxinteger,
  math.mininteger, 1.5, -0.0, 1/0, -1/0, 0/0, "", "x", ("y"):rep(63), ("z"):rep(64),
  ("long string repeated "):rep(3), "a\0b\255",
  {}, {1, 2, 3}, {1.5, 2.5}, {"a", "b", "c"}, {a = 1, b = {c = {d = "e"}}},
  {id = 7, name = "user7", score = 10.5, tags = {"a", "b"}},
  {shared, shared, {shared}}, cyc, {[{}] = 1, [true] = false, [2.5] = "f"},
  setmetatable({x = 1}, {__index = {y = 2}}), setmetatable({}, {__name = "Point"}),
  {string, table, package.loaded}, _G, {g = _G},
  setmetatable({payload = {1, 2, {3}}}, mt), {h = setmetatable({payload = "p"}, mt)},
  {("r"):rep(40), ("r"):rep(40)}, {1, 2, nil, 4, n = 4},
}
for i = 1, 50 do
  local ok, s = pcall(luamp.dumps, samples[i])
  if ok then
    local f = assert(io.open(string.format("%s/seed%02d", dir, i), "wb"))
    f:write(s)
    f:close()
  end
end
-- a few with functions too: the fuzzer must refuse them cleanly
local up = 5
for i, f in ipairs({function() return up end, string.format, {fn = function(x) return x + up end}}) do
  local out = assert(io.open(string.format("%s/func%02d", dir, i), "wb"))
  out:write(luamp.dumps(f))
  out:close()
end
