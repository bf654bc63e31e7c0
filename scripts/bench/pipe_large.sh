#!/usr/bin/env bash
# Pipe throughput for large messages: a child sends N messages of SIZE bytes with
# send_bytes, the parent receives them with recv_bytes (each into a fresh Lua string).
# luamp against Python multiprocessing's Pipe (send_bytes/recv_bytes). Receive buffers
# grow as bytes arrive and the page faults of that growth are part of what is measured.
# Best of ROUNDS (default 3) alternating runs; prints MB/s per size and the ratio.
# Usage: scripts/bench/pipe_large.sh [sizes in MiB...]   (build first: scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${LUAMP_BUILD:-build}
[[ $# -gt 0 ]] && sizes=("$@") || sizes=(1 16 128)
rounds=${ROUNDS:-3}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

cat > "$tmp/big.lua" <<'L'
local luamp = require "luamp"
local mib = tonumber(arg[1])
local size, n = mib << 20, math.max(4, 512 // mib)
local a, b = luamp.Pipe()
local p = luamp.Process{target = function()
  local s = string.rep("x", size)
  a:send_bytes("ready")
  for _ = 1, n do a:send_bytes(s) end
end}
p:start()
assert(b:recv_bytes() == "ready")
local t0, total = luamp.time(), 0
for _ = 1, n do total = total + #b:recv_bytes() end
print(string.format("%.1f", total / (luamp.time() - t0) / 1e6))
p:join()
L

cat > "$tmp/big.py" <<'P'
import multiprocessing as mp, sys, time
def send(c, size, n):
    s = b"x" * size
    c.send_bytes(b"ready")
    for _ in range(n): c.send_bytes(s)
if __name__ == "__main__":
    mp.set_start_method("fork")
    mib = int(sys.argv[1]); size = mib << 20; n = max(4, 512 // mib)
    a, b = mp.Pipe()
    p = mp.Process(target=send, args=(a, size, n)); p.start()
    assert b.recv_bytes() == b"ready"
    t0 = time.monotonic(); total = 0
    for _ in range(n): total += len(b.recv_bytes())
    print("%.1f" % (total / (time.monotonic() - t0) / 1e6))
    p.join()
P

max() { grep . | sort -g | tail -1; }
results=""
echo "Pipe throughput for large messages (MB/s, best of $rounds runs)"
for mib in "${sizes[@]}"; do
  l_all="" p_all=""
  for ((r = 0; r < rounds; r++)); do
    l_all+=$(LUA_CPATH="$build/?.so;;" lua5.4 "$tmp/big.lua" "$mib")$'\n'
    p_all+=$(python3 "$tmp/big.py" "$mib")$'\n'
  done
  l=$(max <<<"$l_all"); p=$(max <<<"$p_all")
  awk -v m="$mib" -v l="$l" -v p="$p" 'BEGIN {
    printf "  %4d MiB messages: luamp %8.1f   python %8.1f   luamp/python %.2fx\n", m, l, p, l / p }'
  results+="RESULT name=pipe_large.${mib}MiB luamp=$l python=$p peer=- unit=MB/s"$'\n'
done
# machine-readable lines for scripts/bench/run.sh
printf "%s" "$results"
