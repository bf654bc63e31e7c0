-- What tracing costs (luamp.trace_start): run with build/luamp scripts/bench/trace.lua
--  1. recording one task span, as the pool does per chunk when tracing is on (CPU time,
--     best of five rounds of 200k);
--  2. a pool:map of 20k one-item chunks with tracing off and on (wall time, best of
--     three, taking turns), per chunk.
local luamp = require "luamp"
local T = luamp._T

local function best(rounds, fn)
  local b = math.huge
  for _ = 1, rounds do b = math.min(b, fn()) end
  return b
end

local N = 200000
local path = os.tmpname()
luamp.trace_start(path)
local per_span = best(5, function()
  local s = luamp.time()
  local t0 = os.clock()
  for i = 1, N do
    T.span("task", 1234, s, 1e-6, 1, i, 1, true)
  end
  return (os.clock() - t0) / N
end)
local t0 = os.clock()
luamp.trace_stop()
local write = os.clock() - t0
print(string.format("record one span: %.3f us (CPU; writing %d spans: %.3f us each)",
  per_span * 1e6, 5 * N, write / (5 * N) * 1e6))

local pool <close> = luamp.Pool(2)
local items = {}
for i = 1, 20000 do items[i] = i end
local f = function(x) return x end
local off, on = math.huge, math.huge
for _ = 1, 3 do
  local a = luamp.time()
  pool:map(f, items, {chunksize = 1})
  off = math.min(off, luamp.time() - a)
  luamp.trace_start(path)
  a = luamp.time()
  pool:map(f, items, {chunksize = 1})
  on = math.min(on, luamp.time() - a)
  luamp.trace_stop()
end
os.remove(path)
print(string.format("pool:map, 20k one-item chunks: off %.2f us/chunk, on %.2f us/chunk (difference %.2f us, within the noise of a loaded machine)",
  off / #items * 1e6, on / #items * 1e6, (on - off) / #items * 1e6))
