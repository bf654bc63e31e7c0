#!/usr/bin/env bash
# Private memory (USS: Private_Clean + Private_Dirty of /proc/PID/smaps_rollup, in KiB) of
# an idle Pool worker and of a started Process that waits, luamp against Python
# multiprocessing (fork). Each side measures its own children while they wait: the Pool
# after one map has run on it, the Process blocked on an Event. Children are found in
# /proc/self/task/<pid>/children, so both sides are measured the same way.
# Usage: scripts/bench/memory.sh   (build first: scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

cat > "$tmp/bench.lua" <<'L'
local luamp = require "luamp"
local function uss(pid)
  local f = io.open("/proc/" .. pid .. "/smaps_rollup")
  if not f then return nil end
  local kib = 0
  for line in f:lines() do
    local n = line:match("^Private_%a+:%s+(%d+) kB")
    if n then kib = kib + tonumber(n) end
  end
  f:close()
  return kib
end
local function children()
  local me = luamp.getpid()
  local f = assert(io.open(("/proc/%d/task/%d/children"):format(me, me)))
  local s = f:read("a")
  f:close()
  local t = {}
  for pid in s:gmatch("%d+") do t[#t + 1] = tonumber(pid) end
  return t
end
local function min_uss()
  local best
  for _, pid in ipairs(children()) do
    local k = uss(pid)
    if k and (not best or k < best) then best = k end
  end
  return best
end
do
  local pool <close> = luamp.Pool(2)
  pool:map(function(x) return x * x end, {1, 2, 3, 4})
  print(min_uss())
end
local e = luamp.Event()
local p = luamp.Process{target = function() e:wait() end}
p:start()
while #children() == 0 do luamp.sleep(0.001) end
luamp.sleep(0.05)   -- let the child reach its wait
print(min_uss())
e:set()
p:join()
L

cat > "$tmp/bench.py" <<'P'
import multiprocessing as mp, os, time
def uss(pid):
    kib = 0
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Private_"):
                kib += int(line.split()[1])
    return kib
def children():
    me = os.getpid()
    with open("/proc/%d/task/%d/children" % (me, me)) as f:
        return [int(p) for p in f.read().split()]
def sq(x): return x * x
def wait(e): e.wait()
if __name__ == "__main__":
    mp.set_start_method("fork")
    with mp.Pool(2) as pool:
        pool.map(sq, [1, 2, 3, 4])
        print(min(uss(w.pid) for w in pool._pool))
    e = mp.Event()
    p = mp.Process(target=wait, args=(e,))
    p.start()
    time.sleep(0.05)
    print(uss(p.pid))
    e.set()
    p.join()
P

{ read -r l_pool; read -r l_proc; } < <(build/luamp "$tmp/bench.lua")
{ read -r p_pool; read -r p_proc; } < <(python3 "$tmp/bench.py")
echo "private memory (USS, KiB) of a child, smaps_rollup Private_*"
printf "  %-30s %10s %10s\n" "" luamp python "idle Pool worker" "$l_pool" "$p_pool" \
  "started Process (waiting)" "$l_proc" "$p_proc"
echo "RESULT name=memory.pool_worker luamp=$l_pool python=$p_pool peer=- unit=KiB"
echo "RESULT name=memory.process luamp=$l_proc python=$p_proc peer=- unit=KiB"
