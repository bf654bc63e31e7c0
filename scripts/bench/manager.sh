#!/usr/bin/env bash
# Manager proxy round trips and Manager() start+shutdown: luamp against Python's
# multiprocessing Manager and a raw C round trip over a TCP loopback socket (a forked
# echo server, TCP_NODELAY, 64-byte messages). Both managers listen on 127.0.0.1 TCP.
# Round trips: d[k] = v, d[k], and Queue put+get (two calls, shown per pair). Best of
# ROUNDS (default 3) alternating runs; microseconds per operation and the ratios.
# Usage: scripts/bench/manager.sh [calls]   (build first: scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${LUAMP_BUILD:-build}
n=${1:-5000}
rounds=${ROUNDS:-3}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

cat > "$tmp/rt.c" <<'C'
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static int full(int fd, char *b, int n, int wr) {
  for (int d = 0; d < n;) { int r = wr ? write(fd, b + d, n - d) : read(fd, b + d, n - d); if (r <= 0) return -1; d += r; }
  return 0;
}
int main(int argc, char **argv) {
  int n = atoi(argv[1]), one = 1;
  int l = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t sl = sizeof sa;
  if (bind(l, (struct sockaddr *)&sa, sl) || listen(l, 1) || getsockname(l, (struct sockaddr *)&sa, &sl)) return 1;
  char buf[64] = {0};
  pid_t p = fork();
  if (p == 0) {
    int c = accept(l, NULL, NULL);
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    for (int i = 0; i < n; i++) if (full(c, buf, 64, 0) || full(c, buf, 64, 1)) _exit(1);
    _exit(0);
  }
  int c = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(c, (struct sockaddr *)&sa, sl)) return 1;
  setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < n; i++) if (full(c, buf, 64, 1) || full(c, buf, 64, 0)) return 1;
  clock_gettime(CLOCK_MONOTONIC, &b);
  waitpid(p, NULL, 0);
  printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3) / n);
  return 0;
}
C
cc -O2 -o "$tmp/rt" "$tmp/rt.c"

cat > "$tmp/m.lua" <<'L'
local luamp = require "luamp"
local n, what = tonumber(arg[1]), arg[2]
if what == "start" then
  local k = 20
  local t0 = luamp.time()
  for _ = 1, k do
    local m = luamp.Manager{address = {"127.0.0.1", 0}}
    m:shutdown()
  end
  print(string.format("%.3f", (luamp.time() - t0) / k * 1e3))
  return
end
local m = luamp.Manager{address = {"127.0.0.1", 0}}
local d, q = m:dict(), m:Queue()
d.k = 0
local t0 = luamp.time()
if what == "set" then
  for i = 1, n do d.k = i end
elseif what == "get" then
  for _ = 1, n do local _ = d.k end
else
  for i = 1, n do q:put(i); q:get() end
end
print(string.format("%.3f", (luamp.time() - t0) / n * 1e6))
m:shutdown()
L

cat > "$tmp/m.py" <<'P'
import sys, time
from multiprocessing.managers import SyncManager
if __name__ == "__main__":
    n, what = int(sys.argv[1]), sys.argv[2]
    if what == "start":
        k = 5
        t0 = time.monotonic()
        for _ in range(k):
            m = SyncManager(address=("127.0.0.1", 0)); m.start(); m.shutdown()
        print("%.3f" % ((time.monotonic() - t0) / k * 1e3))
        sys.exit(0)
    m = SyncManager(address=("127.0.0.1", 0)); m.start()
    d, q = m.dict(), m.Queue()
    d["k"] = 0
    t0 = time.monotonic()
    if what == "set":
        for i in range(n): d["k"] = i
    elif what == "get":
        for _ in range(n): d["k"]
    else:
        for i in range(n): q.put(i); q.get()
    print("%.3f" % ((time.monotonic() - t0) / n * 1e6))
    m.shutdown()
P

min() { grep . | sort -g | head -1; }
declare -A all
for ((r = 0; r < rounds; r++)); do
  all[c]+=$("$tmp/rt" "$n")$'\n'
  for w in set get queue start; do
    all[l$w]+=$("$build/luamp" "$tmp/m.lua" "$n" $w)$'\n'
    all[p$w]+=$(python3 "$tmp/m.py" "$n" $w)$'\n'
  done
done
c=$(min <<<"${all[c]}")
declare -A best
for k in lset lget lqueue lstart pset pget pqueue pstart; do best[$k]=$(min <<<"${all[$k]}"); done
echo "Manager proxy calls over TCP loopback, $n calls, best of $rounds runs"
printf "  %-44s %9s us\n" "raw C TCP round trip (64 bytes)" "$c" \
  "luamp d[k] = v" "${best[lset]}" "luamp d[k]" "${best[lget]}" "luamp q:put + q:get (2 calls)" "${best[lqueue]}" \
  "python d[k] = v" "${best[pset]}" "python d[k]" "${best[pget]}" "python q.put + q.get (2 calls)" "${best[pqueue]}"
printf "  %-44s %9s ms\n" "luamp Manager() start+shutdown" "${best[lstart]}" \
  "python Manager() start+shutdown" "${best[pstart]}"
awk -v c="$c" -v ls="${best[lset]}" -v lg="${best[lget]}" -v lq="${best[lqueue]}" \
    -v ps="${best[pset]}" -v pg="${best[pget]}" -v pq="${best[pqueue]}" \
    -v lst="${best[lstart]}" -v pst="${best[pstart]}" 'BEGIN {
  printf "  luamp d[k] = v / raw C        = %.2fx  (goal <= 1.5x)\n", ls / c
  printf "  luamp d[k] / raw C            = %.2fx  (goal <= 1.5x)\n", lg / c
  printf "  luamp queue call / raw C      = %.2fx  (goal <= 1.5x)\n", lq / 2 / c
  printf "  python / luamp d[k] = v       = %.2fx  (goal >= 4x)\n", ps / ls
  printf "  python / luamp d[k]           = %.2fx  (goal >= 4x)\n", pg / lg
  printf "  python / luamp queue put+get  = %.2fx  (goal >= 4x)\n", pq / lq
  printf "  luamp start+shutdown          = %s ms (goal <= 5 ms); python / luamp = %.1fx\n", lst, pst / lst }'
# machine-readable lines for scripts/bench/run.sh (a queue put+get is two calls: its
# raw C reference is two round trips)
c2=$(awk -v c="$c" 'BEGIN { printf "%.3f", 2 * c }')
echo "RESULT name=manager.set luamp=${best[lset]} python=${best[pset]} peer=$c unit=us"
echo "RESULT name=manager.get luamp=${best[lget]} python=${best[pget]} peer=$c unit=us"
echo "RESULT name=manager.queue luamp=${best[lqueue]} python=${best[pqueue]} peer=$c2 unit=us"
echo "RESULT name=manager.start luamp=${best[lstart]} python=${best[pstart]} peer=- unit=ms"
