#!/usr/bin/env bash
# Pool throughput and latency: luamp.Pool vs Python multiprocessing.Pool (fork) vs the
# thread pool of luv (Debian's lua-luv, uv.new_work, 2 threads: one Lua state each, as a
# Lua user would pick instead; integers cross as numbers) vs a raw C socketpair round
# trip, in one run.
#   1. map of f(x) = x*x over 1,000,000 items on 2 workers (default chunksize)
#   2. chunksize=1: tasks per second over 20,000 items on 2 workers
#   3. apply_async(f, {i}):get() round trip, one at a time, vs a raw C round trip of 8
#      bytes over a socketpair to a forked echo process
#   4. oversubscription: 1 and 2 again on Pool(8) (this machine has fewer cores), as a
#      fraction of Pool(2)'s throughput
#   5. CPU-bound scaling: a naive prime count per item, 1 worker vs 2
# Ends with RESULT lines for scripts/bench/run.sh.
# Usage: scripts/bench/pool.sh [scale]   (scale 1 = the sizes above; build first)
#   ROUNDS=n: best of n runs per figure (default 3; the chunksize=1 runs: 3n). No luv installed: its column is "-".
set -euo pipefail
cd "$(dirname "$0")/../.."
scale=${1:-1}
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
  if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) < 0) return 1;
  pid_t p = fork();
  if (p == 0) {
    close(sv[0]);
    long v;
    while (read(sv[1], &v, sizeof v) == sizeof v) { v++; if (write(sv[1], &v, sizeof v) != sizeof v) break; }
    _exit(0);
  }
  close(sv[1]);
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < n; i++) {
    long v = i;
    if (write(sv[0], &v, sizeof v) != sizeof v || read(sv[0], &v, sizeof v) != sizeof v || v != i + 1) return 1;
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  close(sv[0]);
  waitpid(p, NULL, 0);
  printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3) / n);
  return 0;
}
C
cc -O2 -o "$tmp/rt" "$tmp/rt.c"

cat > "$tmp/bench.lua" <<'L'
local luamp = require "luamp"
local what, n = arg[1], tonumber(arg[2])
local function f(x) return x * x end
local function ident(x) return x end
local function primes(limit)
  local count = 0
  for k = 2, limit do
    local prime = true
    for d = 2, math.floor(math.sqrt(k)) do
      if k % d == 0 then prime = false; break end
    end
    if prime then count = count + 1 end
  end
  return count
end
local function range(m)
  local t = luamp._core.table_new(m)
  for i = 1, m do t[i] = i - 1 end
  return t
end
local procs = tonumber(arg[3]) or 2
if what == "map" then
  local pool <close> = luamp.Pool(procs)
  pool:map(f, {1, 2, 3, 4})
  local items = range(n)
  local t0 = luamp.time()
  local r = pool:map(f, items)
  local dt = luamp.time() - t0
  assert(r.n == n and r[n] == (n - 1) * (n - 1))
  print(string.format("%.4f", dt))
elseif what == "tasks" then
  local pool <close> = luamp.Pool(procs)
  pool:map(f, {1, 2, 3, 4})
  local items = range(n)
  local t0 = luamp.time()
  local r = pool:map(f, items, 1)
  local dt = luamp.time() - t0
  assert(r.n == n)
  print(string.format("%.0f", n / dt))
elseif what == "apply" then
  local pool <close> = luamp.Pool(1)
  for i = 1, 100 do pool:apply_async(ident, {i}):get() end
  local t0 = luamp.time()
  for i = 1, n do assert(pool:apply_async(ident, {i}):get() == i) end
  print(string.format("%.3f", (luamp.time() - t0) / n * 1e6))
elseif what == "cpu" then
  local items = {}
  for i = 1, n do items[i] = 30000 end
  local out = {}
  for _, procs in ipairs({1, 2}) do
    local pool <close> = luamp.Pool(procs)
    pool:map(primes, {10, 10})
    local t0 = luamp.time()
    local r = pool:map(primes, items, 1)
    out[#out + 1] = string.format("%.4f", luamp.time() - t0)
    assert(r[n] == 3245)
  end
  print(table.concat(out, " "))
end
L

cat > "$tmp/bench.py" <<'P'
import multiprocessing as mp, sys, time, math
def f(x): return x * x
def ident(x): return x
def primes(limit):
    count = 0
    for k in range(2, limit + 1):
        prime = True
        for d in range(2, int(math.sqrt(k)) + 1):
            if k % d == 0:
                prime = False
                break
        if prime: count += 1
    return count
if __name__ == "__main__":
    mp.set_start_method("fork")
    what, n = sys.argv[1], int(sys.argv[2])
    if what == "map":
        with mp.Pool(2) as pool:
            pool.map(f, range(4))
            t0 = time.monotonic(); r = pool.map(f, range(n)); dt = time.monotonic() - t0
            print("%.4f" % dt)
    elif what == "tasks":
        with mp.Pool(2) as pool:
            pool.map(f, range(4))
            t0 = time.monotonic(); r = pool.map(f, range(n), 1); dt = time.monotonic() - t0
            print("%.0f" % (n / dt))
    elif what == "apply":
        with mp.Pool(1) as pool:
            for i in range(100): pool.apply_async(ident, (i,)).get()
            t0 = time.monotonic()
            for i in range(n): pool.apply_async(ident, (i,)).get()
            print("%.3f" % ((time.monotonic() - t0) / n * 1e6))
    elif what == "cpu":
        out = []
        for procs in (1, 2):
            with mp.Pool(procs) as pool:
                pool.map(primes, [10, 10])
                t0 = time.monotonic(); pool.map(primes, [30000] * n, 1)
                out.append("%.4f" % (time.monotonic() - t0))
        print(" ".join(out))
P

cat > "$tmp/luv.lua" <<'L'
-- the same tiny tasks on luv's thread pool (run with UV_THREADPOOL_SIZE=2)
local uv = require "luv"
local what, n = arg[1], tonumber(arg[2])
local done = 0
local work = uv.new_work(function(x) return x * x end, function() done = done + 1 end)
if what == "tasks" then
  work:queue(1); uv.run()
  done = 0
  local t0 = uv.hrtime()
  for i = 1, n do work:queue(i) end
  uv.run()
  assert(done == n)
  print(string.format("%.0f", n / ((uv.hrtime() - t0) / 1e9)))
elseif what == "apply" then
  for i = 1, 100 do work:queue(i); uv.run() end
  local t0 = uv.hrtime()
  for i = 1, n do work:queue(i); uv.run() end
  print(string.format("%.3f", (uv.hrtime() - t0) / 1e3 / n))
end
L

L() { build/luamp "$tmp/bench.lua" "$@"; }
P() { python3 "$tmp/bench.py" "$@"; }
if lua5.4 -e 'require "luv"' 2>/dev/null; then
  V() { UV_THREADPOOL_SIZE=2 lua5.4 "$tmp/luv.lua" "$@"; }
else
  V() { echo -; }
fi
# The machine is shared: every figure is the best of $rounds runs, luamp and the others
# taking turns.
rounds=${ROUNDS:-3}
lo() { sort -g | head -1; }
hi() { sort -g | tail -1; }
nmap=$((1000000 * scale)); ntasks=$((20000 * scale)); napply=$((5000 * scale)); ncpu=$((16 * scale))
# The chunksize=1 runs last ~10 ms each and their rate is bimodal (20,000 tasks on Pool(2)
# ranged 1.2M-2.1M tasks/s on a quiet machine: it turns on whether the workers' wake-ups
# land on the parent's CPU), so best of 3 was a draw: they get three times the rounds,
# every runner alike.
trounds=$((rounds * 3))
for ((r = 0; r < trounds; r++)); do
  L tasks "$ntasks" >> "$tmp/lt"; P tasks "$ntasks" >> "$tmp/pt"; V tasks "$ntasks" >> "$tmp/vt"
  L tasks "$ntasks" 8 >> "$tmp/lt8"
done
for ((r = 0; r < rounds; r++)); do
  L map "$nmap" >> "$tmp/lm"; P map "$nmap" >> "$tmp/pm"; L map "$nmap" 8 >> "$tmp/lm8"
  "$tmp/rt" "$((napply * 4))" >> "$tmp/c"
  L apply "$napply" >> "$tmp/la"; P apply "$((napply / 5))" >> "$tmp/pa"; V apply "$napply" >> "$tmp/va"
  L cpu "$ncpu" >> "$tmp/lcpu"; P cpu "$ncpu" >> "$tmp/pcpu"
done
lm=$(lo < "$tmp/lm"); pm=$(lo < "$tmp/pm"); lt=$(hi < "$tmp/lt"); pt=$(hi < "$tmp/pt")
lm8=$(lo < "$tmp/lm8"); lt8=$(hi < "$tmp/lt8"); vt=$(hi < "$tmp/vt"); va=$(lo < "$tmp/va")
c=$(lo < "$tmp/c"); la=$(lo < "$tmp/la"); pa=$(lo < "$tmp/pa")
l1=$(cut -d' ' -f1 "$tmp/lcpu" | lo); l2=$(cut -d' ' -f2 "$tmp/lcpu" | lo)
p1=$(cut -d' ' -f1 "$tmp/pcpu" | lo); p2=$(cut -d' ' -f2 "$tmp/pcpu" | lo)

echo "Pool benchmarks, best of $rounds (chunksize=1: of $trounds; 2 workers unless said; load average: $(cut -d' ' -f1-3 /proc/loadavg))"
printf "  %-46s %12s %12s %12s\n" "" "luamp" "python" "luv threads"
printf "  %-46s %12s %12s\n" "map(x*x) over $nmap items, seconds" "$lm" "$pm"
printf "  %-46s %12s %12s %12s\n" "map chunksize=1 over $ntasks items, tasks/s" "$lt" "$pt" "$vt"
printf "  %-46s %12s %12s %12s\n" "apply_async():get() round trip, us" "$la" "$pa" "$va"
printf "  %-46s %12s\n" "Pool(8): map(x*x) over $nmap items, seconds" "$lm8"
printf "  %-46s %12s\n" "Pool(8): map chunksize=1, tasks/s" "$lt8"
printf "  %-46s %12s\n" "raw C socketpair round trip, us" "$c"
printf "  %-46s %12s %12s\n" "prime counts x$ncpu, 1 worker, seconds" "$l1" "$p1"
printf "  %-46s %12s %12s\n" "prime counts x$ncpu, 2 workers, seconds" "$l2" "$p2"
awk -v lm="$lm" -v pm="$pm" -v lt="$lt" -v pt="$pt" -v la="$la" -v c="$c" -v pa="$pa" \
    -v l1="$l1" -v l2="$l2" -v p1="$p1" -v p2="$p2" 'BEGIN {
  printf "  1M map: python / luamp            = %.2fx  (goal >= 5x)\n", pm / lm
  printf "  chunksize=1: luamp / python       = %.2fx  (goal >= 10x)\n", lt / pt
  printf "  round trip: luamp / raw C         = %.2fx  (goal < 2x; python / luamp = %.1fx)\n", la / c, pa / la
  printf "  CPU scaling 1 -> 2 workers: luamp = %.2fx  (goal >= 1.8x; python %.2fx)\n", l1 / l2, p1 / p2 }'
awk -v lm8="$lm8" -v lm="$lm" -v lt8="$lt8" -v lt="$lt" 'BEGIN {
  printf "  Pool(8) / Pool(2) throughput: map %.2fx, chunksize=1 %.2fx  (goal >= 0.9x)\n", lm / lm8, lt8 / lt }'
# for scripts/bench/run.sh (oversubscription as rates: Pool(8) against Pool(2))
echo "RESULT name=pool.map1m luamp=$lm python=$pm peer=- unit=s"
echo "RESULT name=pool.chunksize1 luamp=$lt python=$pt peer=$vt unit=tasks/s"
echo "RESULT name=pool.apply_rt luamp=$la python=$pa peer=$va unit=us"
awk -v n="$nmap" -v lm8="$lm8" -v lm="$lm" 'BEGIN {
  printf "RESULT name=pool.oversub_map1m luamp=%.0f python=- peer=%.0f unit=items/s\n", n / lm8, n / lm }'
echo "RESULT name=pool.oversub_chunksize1 luamp=$lt8 python=- peer=$lt unit=tasks/s"
echo "RESULT name=pool.cpu2 luamp=$l2 python=$p2 peer=$l1 unit=s"
