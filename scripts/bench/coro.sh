#!/usr/bin/env bash
# Tasks (luamp.task / luamp.run), one run of each case:
#  1. task switch: 100 tasks each doing luamp.sleep(0) (suspend, run the others, resume)
#     vs a bare coroutine.resume/yield pair (goal <= 3x per switch);
#  2. 10,000 tasks each doing q:get() on items another process puts, vs one plain
#     blocking loop of 10,000 q:get() (items/s; goal >= 0.8x);
#  3. "50 commands, 4 at a time, each with a timeout": luamp tasks + Semaphore vs Python
#     asyncio (create_subprocess_exec + Semaphore + wait_for): wall and CPU (user+sys,
#     children included; goal: at least as fast, less CPU).
# Usage: scripts/bench/coro.sh   (build first: scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

cat > "$tmp/switch.lua" <<'L'
local luamp = require "luamp"
local N, K = 100, 2000
local co = coroutine.wrap(function() while true do coroutine.yield() end end)
local t0 = os.clock()
for _ = 1, N * K do co() end
local bare = (os.clock() - t0) / (N * K)
for _ = 1, N do luamp.task(function() for _ = 1, K do luamp.sleep(0) end end) end
t0 = os.clock()
luamp.run()
local task = (os.clock() - t0) / (N * K)
print(string.format("%.1f %.1f", bare * 1e9, task * 1e9))
L

cat > "$tmp/queue.lua" <<'L'
local luamp = require "luamp"
local N = 10000
local mode = arg[1]
local q, go = luamp.Queue(), luamp.Event()
local p = luamp.Process{target = function() go:wait(); for i = 1, N do q:put(i) end end}
p:start()
local sum = 0
local t0
if mode == "plain" then
  t0 = luamp.time(); go:set()
  for _ = 1, N do sum = sum + q:get() end
else
  for _ = 1, N do luamp.task(function() local v = q:get(); sum = sum + v end) end
  luamp.task(function() t0 = luamp.time(); go:set() end)
  luamp.run()
end
local took = luamp.time() - t0
p:join()
assert(sum == N * (N + 1) // 2, "lost items")
print(string.format("%.0f", N / took))
L

cat > "$tmp/cmds.lua" <<'L'
local luamp = require "luamp"
local sp = luamp.subprocess
local slots = luamp.Semaphore(4)
for i = 1, 50 do
  luamp.task(function()
    slots:acquire()
    local r = sp.run({"sh", "-c", "echo " .. i}, {capture_output = true, timeout = 10})
    slots:release()
    assert(r.stdout == i .. "\n")
  end)
end
luamp.run()
L

cat > "$tmp/cmds.py" <<'P'
import asyncio
async def one(sem, i):
    async with sem:
        p = await asyncio.create_subprocess_exec("sh", "-c", "echo %d" % i, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(p.communicate(), timeout=10)
        assert out == b"%d\n" % i
async def main():
    sem = asyncio.Semaphore(4)
    await asyncio.gather(*(one(sem, i) for i in range(1, 51)))
asyncio.run(main())
P

read bare task < <(build/luamp "$tmp/switch.lua")
echo "1. task switch (100 tasks x 2000 sleep(0)), CPU per switch:"
awk -v b="$bare" -v t="$task" 'BEGIN {
  printf "  bare coroutine resume+yield %8.1f ns\n  task sleep(0) switch       %8.1f ns\n  task / bare = %.2fx  (goal <= 3x)\n", b, t, t / b }'

plain=$(build/luamp "$tmp/queue.lua" plain)
tasks=$(build/luamp "$tmp/queue.lua" tasks)
echo "2. 10,000 q:get() on items another process puts:"
awk -v p="$plain" -v t="$tasks" 'BEGIN {
  printf "  plain blocking loop  %10d items/s\n  10,000 tasks         %10d items/s\n  tasks / plain = %.2fx  (goal >= 0.8x)\n", p, t, t / p }'

TIMEFORMAT='%R %U %S'
{ time build/luamp "$tmp/cmds.lua"; } 2> "$tmp/tl"
{ time python3 "$tmp/cmds.py"; } 2> "$tmp/tp"
read lw lu ls < "$tmp/tl"
read pw pu ps < "$tmp/tp"
echo "3. 50 commands, 4 at a time (wall, CPU = user+sys with children):"
awk -v lw="$lw" -v lu="$lu" -v ls="$ls" -v pw="$pw" -v pu="$pu" -v ps="$ps" 'BEGIN {
  printf "  luamp tasks     %6.3f s wall %6.3f s cpu\n  python asyncio  %6.3f s wall %6.3f s cpu\n", lw, lu + ls, pw, pu + ps
  printf "  python / luamp = %.2fx wall, %.2fx cpu  (goal >= 1x both)\n", pw / lw, (pu + ps) / (lu + ls) }'

# machine-readable lines for scripts/bench/run.sh
awk -v b="$bare" -v t="$task" -v p="$plain" -v q="$tasks" \
    -v lw="$lw" -v lu="$lu" -v ls="$ls" -v pw="$pw" -v pu="$pu" -v ps="$ps" 'BEGIN {
  printf "RESULT name=coro.switch luamp=%.1f python=- peer=%.1f unit=ns\n", t, b
  printf "RESULT name=coro.queue luamp=%d python=- peer=%d unit=items/s\n", q, p
  printf "RESULT name=coro.cmds_wall luamp=%.3f python=%.3f peer=- unit=s\n", lw, pw
  printf "RESULT name=coro.cmds_cpu luamp=%.3f python=%.3f peer=- unit=s\n", lu + ls, pu + ps }'
