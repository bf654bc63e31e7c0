#!/usr/bin/env bash
# Handles to a running process (issue 10). One round: make a Queue, send it to a worker
# that is already running (the worker never inherited it), the worker puts one item in
# it, the parent gets the item. luamp sends the Queue through a Pipe and through another
# Queue; Python's only way to hand a queue to a running process is a Manager().Queue()
# proxy (a Pipe carries the proxy; put and get are round trips to the manager process).
# Also: the same Queue sent again each round (the receiver already has it), and a round
# with a Lock instead of a Queue.
#
# Then the cost for messages that carry no handle: Pipe round trip of an integer and a
# Queue ping-pong of small items, this build against BASE_BUILD (a build of the code
# before handles travelled; skipped when unset), alternating runs, best of ROUNDS.
# Usage: BASE_BUILD=/path/to/old/build scripts/bench/handles.sh [rounds] [pingpongs]
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${LUAMP_BUILD:-build}
n=${1:-2000}
m=${2:-20000}
rounds=${ROUNDS:-3}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

cat > "$tmp/h.lua" <<'L'
local luamp = require "luamp"
local n, mode = tonumber(arg[1]), arg[2]
local a, b = luamp.Pipe()
local carrier = luamp.Queue()
local p = luamp.Process{target = function()
  while true do
    local obj
    if mode == "queue-in-queue" then obj = carrier:get() else obj = a:recv() end
    if obj == false then return end
    -- dropped at once, as Python's refcounting drops the proxy (Lua's collector would
    -- get to it much later, with its descriptors and mappings still held)
    if mode == "lock" then obj:acquire(); obj:release(); a:send(true)
    else obj:put(1) end
    if mode ~= "same-queue" then obj:close() end
  end
end}
p:start()
local same = luamp.Queue()
local t0 = luamp.time()
for _ = 1, n do
  if mode == "lock" then
    b:send(luamp.Lock()); b:recv()
  else
    local q = mode == "same-queue" and same or luamp.Queue()
    if mode == "queue-in-queue" then carrier:put(q) else b:send(q) end
    assert(q:get() == 1)
    if mode ~= "same-queue" then q:close() end
  end
end
local dt = (luamp.time() - t0) / n * 1e6
if mode == "queue-in-queue" then carrier:put(false) else b:send(false) end
p:join()
print(string.format("%.2f", dt))
L

cat > "$tmp/h.py" <<'P'
import multiprocessing as mp, sys, time
def worker(c):
    while True:
        q = c.recv()
        if q is None: return
        q.put(1)
if __name__ == "__main__":
    mp.set_start_method("fork")
    n = int(sys.argv[1])
    m = mp.Manager()
    a, b = mp.Pipe()
    p = mp.Process(target=worker, args=(a,)); p.start()
    t0 = time.monotonic()
    for _ in range(n):
        q = m.Queue()
        b.send(q)
        assert q.get() == 1
        del q
    dt = (time.monotonic() - t0) / n * 1e6
    b.send(None); p.join(); m.shutdown()
    print("%.2f" % dt)
P

cat > "$tmp/plain.lua" <<'L'
local luamp = require "luamp"
local n, mode = tonumber(arg[1]), arg[2]
local t0
if mode == "pipe" then
  local a, b = luamp.Pipe()
  local p = luamp.Process{target = function() for _ = 1, n do a:send(a:recv() + 1) end end}
  p:start()
  t0 = luamp.time()
  local v = 0
  for _ = 1, n do b:send(v); v = b:recv() end
  assert(v == n)
  p:join()
else
  local q1, q2 = luamp.Queue(), luamp.Queue()
  local p = luamp.Process{target = function() for _ = 1, n do q2:put(q1:get() + 1) end end}
  p:start()
  t0 = luamp.time()
  local v = 0
  for _ = 1, n do q1:put(v); v = q2:get() end
  assert(v == n)
  p:join()
end
print(string.format("%.3f", (luamp.time() - t0) / n * 1e6))
L

min() { grep . | sort -g | head -1; }
results=""
declare -A all
modes="new-queue same-queue queue-in-queue lock"
for ((r = 0; r < rounds; r++)); do
  for mode in $modes; do all[$mode]+=$("$build/luamp" "$tmp/h.lua" "$n" "$mode")$'\n'; done
  all[py]+=$(python3 "$tmp/h.py" "$((n / 4 > 200 ? n / 4 : 200))")$'\n'
done
py=$(min <<<"${all[py]}")
echo "Sending a handle to a running process and using it once, $n rounds, best of $rounds runs"
for mode in $modes; do
  v=$(min <<<"${all[$mode]}")
  printf "  luamp %-38s %9s us  (python Manager / luamp = %.0fx)\n" "$mode" "$v" \
    "$(awk -v a="$py" -v b="$v" 'BEGIN{print a / b}')"
  results+="RESULT name=handles.$mode luamp=$v python=$py peer=- unit=us"$'\n'
done
printf "  %-44s %9s us\n" "python Manager().Queue() through a Pipe" "$py"
echo "  (new-queue: Queue() + Pipe send + worker put + get + close; same-queue: the worker"
echo "   already has it; queue-in-queue: sent inside a Queue item; lock: a new Lock, acquired"
echo "   and released by the worker, answer on the Pipe)"

if [[ -n ${BASE_BUILD:-} ]]; then
  for mode in pipe queue; do
    nb="" ob=""
    for ((r = 0; r < rounds; r++)); do
      nb+=$("$build/luamp" "$tmp/plain.lua" "$m" "$mode")$'\n'
      ob+=$("$BASE_BUILD/luamp" "$tmp/plain.lua" "$m" "$mode")$'\n'
    done
    nv=$(min <<<"$nb"); ov=$(min <<<"$ob")
    printf "Messages with no handle, %s ping-pong (%d round trips): before %s us, now %s us (%+.1f%%)\n" \
      "$mode" "$m" "$ov" "$nv" "$(awk -v a="$nv" -v b="$ov" 'BEGIN{print (a / b - 1) * 100}')"
  done
fi
# machine-readable lines for scripts/bench/run.sh
printf "%s" "$results"
