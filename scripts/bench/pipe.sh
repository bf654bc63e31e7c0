#!/usr/bin/env bash
# Pipe round-trip latency: a parent sends a small message, the child answers, N times.
# luamp (send/recv of an integer through the codec, and send_bytes/recv_bytes) against
# Python multiprocessing's Pipe (the same two ways) and a raw C socketpair round trip
# (blocking write/read of 8 bytes). Best of ROUNDS (default 3) alternating runs; prints
# microseconds per round trip and the ratios.
# Usage: scripts/bench/pipe.sh [round trips]   (build first: scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${LUAMP_BUILD:-build}
n=${1:-20000}
rounds=${ROUNDS:-3}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

cat > "$tmp/rt.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int n = atoi(argv[1]), sv[2];
  socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  long long v = 0;
  pid_t p = fork();
  if (p == 0) {
    for (int i = 0; i < n; i++) {
      if (read(sv[1], &v, 8) != 8) _exit(1);
      v++;
      if (write(sv[1], &v, 8) != 8) _exit(1);
    }
    _exit(0);
  }
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < n; i++) {
    if (write(sv[0], &v, 8) != 8 || read(sv[0], &v, 8) != 8) return 1;
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  waitpid(p, NULL, 0);
  printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3) / n);
  return v == n ? 0 : 1;
}
C
cc -O2 -o "$tmp/rt" "$tmp/rt.c"

cat > "$tmp/rt.lua" <<'L'
local luamp = require "luamp"
local n, mode = tonumber(arg[1]), arg[2]
local a, b = luamp.Pipe()
local p
if mode == "values" then
  p = luamp.Process{target = function()
    for _ = 1, n do a:send(a:recv() + 1) end
  end}
else
  p = luamp.Process{target = function()
    for _ = 1, n do a:send_bytes(a:recv_bytes()) end
  end}
end
p:start()
local t0 = luamp.time()
if mode == "values" then
  local v = 0
  for _ = 1, n do b:send(v); v = b:recv() end
  assert(v == n)
else
  local s = "12345678"
  for _ = 1, n do b:send_bytes(s); s = b:recv_bytes() end
end
print(string.format("%.3f", (luamp.time() - t0) / n * 1e6))
p:join()
L

cat > "$tmp/rt.py" <<'P'
import multiprocessing as mp, sys, time
def values(c, n):
    for _ in range(n): c.send(c.recv() + 1)
def raw(c, n):
    for _ in range(n): c.send_bytes(c.recv_bytes())
if __name__ == "__main__":
    mp.set_start_method("fork")
    n, mode = int(sys.argv[1]), sys.argv[2]
    a, b = mp.Pipe()
    p = mp.Process(target=values if mode == "values" else raw, args=(a, n)); p.start()
    t0 = time.monotonic()
    if mode == "values":
        v = 0
        for _ in range(n): b.send(v); v = b.recv()
        assert v == n
    else:
        s = b"12345678"
        for _ in range(n): b.send_bytes(s); s = b.recv_bytes()
    print("%.3f" % ((time.monotonic() - t0) / n * 1e6))
    p.join()
P

min() { grep . | sort -g | head -1; }
c_all="" lv_all="" lb_all="" pv_all="" pb_all=""
for ((r = 0; r < rounds; r++)); do
  c_all+=$("$tmp/rt" "$n")$'\n'
  lv_all+=$("$build/luamp" "$tmp/rt.lua" "$n" values)$'\n'
  lb_all+=$("$build/luamp" "$tmp/rt.lua" "$n" bytes)$'\n'
  pv_all+=$(python3 "$tmp/rt.py" "$n" values)$'\n'
  pb_all+=$(python3 "$tmp/rt.py" "$n" bytes)$'\n'
done
c=$(min <<<"$c_all"); lv=$(min <<<"$lv_all"); lb=$(min <<<"$lb_all")
pv=$(min <<<"$pv_all"); pb=$(min <<<"$pb_all")
echo "Pipe round trip, $n round trips, best of $rounds runs"
printf "  %-40s %8s us\n" "raw C socketpair write/read (8 bytes)" "$c" \
  "luamp send/recv (integer)" "$lv" "luamp send_bytes/recv_bytes (8 bytes)" "$lb" \
  "python Pipe send/recv (integer)" "$pv" "python Pipe send_bytes/recv_bytes" "$pb"
awk -v c="$c" -v lv="$lv" -v lb="$lb" -v pv="$pv" -v pb="$pb" 'BEGIN {
  printf "  luamp send/recv / raw C          = %.2fx  (goal <= 1x)\n", lv / c
  printf "  luamp send_bytes / raw C         = %.2fx\n", lb / c
  printf "  python send/recv / luamp         = %.2fx\n", pv / lv
  printf "  python send_bytes / luamp        = %.2fx\n", pb / lb }'
# machine-readable lines for scripts/bench/run.sh
echo "RESULT name=pipe.roundtrip luamp=$lv python=$pv peer=$c unit=us"
echo "RESULT name=pipe.roundtrip_bytes luamp=$lb python=$pb peer=$c unit=us"
