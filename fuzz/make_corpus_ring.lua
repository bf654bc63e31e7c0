-- Writes the seeds of fuzz_ring's take_decoded mode into fuzz/corpus_ring/ (the take
-- seeds there were written by hand): rings whose records hold encodings of the values a
-- pool sends, so that the fuzzer starts from payloads that decode. Input layout: see
-- fuzz/fuzz_ring.c. Run: LUA_CPATH='build/?.so' lua5.4 fuzz/make_corpus_ring.lua
local luamp = require "luamp"
local dir = arg[1] or "fuzz/corpus_ring"

local MARKER = 0x80000000

-- a record: length, tag, the bytes, padded to 8
local function record(payload, tag)
  return string.pack("<I4I4", #payload, tag) .. payload .. ("\0"):rep(-#payload % 8)
end

local function marker(tag) return string.pack("<I4I4", MARKER, tag) end

-- flags: bit 0 direction, bit 1 relative tail, bit 3 take_decoded, bit 4 into a table,
-- bit 5 at = 5, bits 6..7 n
local function seed(name, flags, head, body)
  local f = assert(io.open(dir .. "/" .. name, "wb"))
  f:write(string.pack("<BI8I8", flags | 2 | 8, head, #body), body)
  f:close()
end

local dumps = luamp.dumps
seed("decoded_values", 1, 0,
  record(dumps({1, "x", true, 2.5, {a = 1}}), 3) .. record(dumps("plain"), 4) ..
  record(dumps(nil), 5) .. record(dumps(false), 6))
-- a chunk's answer, its results decoded into the result table (as take_answer does)
seed("decoded_answer_into", 1 | 16 | 32 | (2 << 6), 0,
  record(dumps({7, 1, true, 0.001, {10, 20}, 0.5}), 1))
-- a chunk's arguments decoded into a table (as worker_next does)
seed("decoded_args_into", 16 | (3 << 6), 0, record(dumps({7, 8, 9}), 2))
-- a marker between records, and one that wraps past the end of the area
seed("decoded_marker", 0, 0,
  record(dumps({1, 2}), 1) .. marker(9) .. record(dumps({k = "v"}), 2))
seed("decoded_wrapped", 1, (4 << 20) - 24,
  record(dumps(12345), 1) .. string.pack("<I4I4", 0xffffffff, 0) ..
  record(dumps({"after", "the", "wrap"}), 2))
-- payloads a decoder refuses: bytecode (not loaded by the fuzzer) and garbage
local up = 5
seed("decoded_function", 1, 0,
  record(dumps(function() return up end), 1) .. record(dumps({ok = true}), 2))
seed("decoded_garbage", 1, 0, record("\255\254garbage", 1) .. record(dumps(1), 2))
