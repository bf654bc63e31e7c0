#!/usr/bin/env bash
# Process start+join latency: luamp vs Python multiprocessing (fork) vs raw C fork+waitpid.
# Usage: scripts/bench/process.sh [iterations] [spawn iterations] [forkserver iterations]
# (build first)
# Then the spawn start method: luamp vs Python spawn vs raw C posix_spawn of `lua5.4 -e ""`,
# and the forkserver start method: luamp vs luamp fork vs Python forkserver.
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-2000}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

cat > "$tmp/fork.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int n = atoi(argv[1]);
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < n; i++) {
    pid_t p = fork();
    if (p == 0) _exit(0);
    int st;
    waitpid(p, &st, 0);
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3) / n);
  /* The same loop, but the parent writes 16 pages after each fork, as any interpreter
   * does: it shows what copy-on-write faults cost on this machine. */
  static char pages[16 * 4096];
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < n; i++) {
    pid_t p = fork();
    if (p == 0) _exit(0);
    for (int k = 0; k < (int)sizeof pages; k += 4096) pages[k]++;
    int st;
    waitpid(p, &st, 0);
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3) / n);
  return 0;
}
C
cc -O2 -o "$tmp/fork" "$tmp/fork.c"

cat > "$tmp/bench.lua" <<'L'
local luamp = require "luamp"
local n = tonumber(arg[1])
local f = function() end
local t0 = luamp.time()
for _ = 1, n do
  local p = luamp.Process{target = f}
  p:start(); p:join()
end
print(string.format("%.3f", (luamp.time() - t0) / n * 1e6))
L

cat > "$tmp/bench.py" <<'P'
import multiprocessing as mp, sys, time
def f(): pass
if __name__ == "__main__":
    mp.set_start_method("fork")
    n = int(sys.argv[1])
    t0 = time.monotonic()
    for _ in range(n):
        p = mp.Process(target=f); p.start(); p.join()
    print("%.3f" % ((time.monotonic() - t0) / n * 1e6))
P

{ read -r c; read -r c16; } < <("$tmp/fork" "$n")
l=$(build/luamp "$tmp/bench.lua" "$n")
p=$(python3 "$tmp/bench.py" "$((n / 4))")
echo "process start+join, $n iterations (python: $((n / 4)))"
printf "  %-34s %10s us\n" "raw C fork+waitpid" "$c" "raw C, parent writes 16 pages" "$c16" \
  "luamp Process" "$l" "python multiprocessing" "$p"
awk -v c="$c" -v c16="$c16" -v l="$l" -v p="$p" 'BEGIN {
  printf "  cost of one copy-on-write fault here ~ %.1f us\n", (c16 - c) / 16
  printf "  luamp / raw C      = %.2fx  (goal <= 1.5x)\n", l / c
  printf "  python / luamp     = %.2fx  (goal >= 5x)\n", p / l }'

# ---- spawn start method: luamp spawn vs Python's spawn vs raw C posix_spawn of lua5.4 ----
ns=${2:-100}
cat > "$tmp/pspawn.c" <<'C'
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
extern char **environ;
int main(int argc, char **argv) {
  int n = atoi(argv[1]);
  char *args[] = {argv[2], "-e", "", NULL};
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < n; i++) {
    pid_t p;
    if (posix_spawn(&p, argv[2], NULL, NULL, args, environ) != 0) return 1;
    int st;
    waitpid(p, &st, 0);
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3) / n);
  return 0;
}
C
cc -O2 -o "$tmp/pspawn" "$tmp/pspawn.c"
sed 's/local luamp = require "luamp"/local luamp = require "luamp"; luamp.set_start_method("spawn")/' \
  "$tmp/bench.lua" > "$tmp/bench_spawn.lua"
sed 's/set_start_method("fork")/set_start_method("spawn")/' "$tmp/bench.py" > "$tmp/bench_spawn.py"
cs=$("$tmp/pspawn" "$ns" "$(command -v lua5.4)")
ls_=$(build/luamp "$tmp/bench_spawn.lua" "$ns")
ps=$(python3 "$tmp/bench_spawn.py" "$(( ns / 5 > 0 ? ns / 5 : 1 ))")
echo "spawn start+join, $ns iterations (python: $(( ns / 5 > 0 ? ns / 5 : 1 )))"
printf "  %-34s %10s us\n" "raw C posix_spawn of lua5.4 -e ''" "$cs" "luamp Process (spawn)" "$ls_" \
  "python multiprocessing (spawn)" "$ps"
awk -v c="$cs" -v l="$ls_" -v p="$ps" 'BEGIN {
  printf "  luamp / raw C      = %.2fx  (goal <= 1.5x)\n", l / c
  printf "  python / luamp     = %.2fx  (goal >= 10x)\n", p / l }'

# ---- forkserver start method: luamp forkserver vs luamp fork vs Python's forkserver ----
nf=${3:-500}
sed 's/local luamp = require "luamp"/local luamp = require "luamp"; luamp.set_start_method("forkserver")/' \
  "$tmp/bench.lua" > "$tmp/bench_fs.lua"
sed 's/set_start_method("fork")/set_start_method("forkserver")/' "$tmp/bench.py" > "$tmp/bench_fs.py"
lfork=$(build/luamp "$tmp/bench.lua" "$nf")
lfs=$(build/luamp "$tmp/bench_fs.lua" "$nf")
pfs=$(python3 "$tmp/bench_fs.py" "$(( nf / 10 > 0 ? nf / 10 : 1 ))")
echo "forkserver start+join, $nf iterations (python: $(( nf / 10 > 0 ? nf / 10 : 1 )); the first start, which starts the server, included)"
printf "  %-34s %10s us\n" "luamp Process (fork)" "$lfork" "luamp Process (forkserver)" "$lfs" \
  "python multiprocessing (forkserver)" "$pfs"
awk -v f="$lfork" -v l="$lfs" -v p="$pfs" 'BEGIN {
  printf "  luamp forkserver / luamp fork = %.2fx  (goal <= 2x)\n", l / f
  printf "  python / luamp     = %.2fx  (goal >= 10x)\n", p / l }'
# machine-readable lines for scripts/bench/run.sh (the fork figure's reference is the
# raw C loop whose parent writes 16 pages, as any interpreter does)
echo "RESULT name=process.fork luamp=$l python=$p peer=$c16 unit=us"
echo "RESULT name=process.spawn luamp=$ls_ python=$ps peer=$cs unit=us"
echo "RESULT name=process.forkserver luamp=$lfs python=$pfs peer=$lfork unit=us"
