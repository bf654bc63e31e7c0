#!/usr/bin/env bash
# Queue throughput: luamp.Queue against Python's multiprocessing.Queue and a raw C
# shared-memory ring (single producer, single consumer, spinning; the ceiling for any
# queue between two processes here). Cases: small items (integers) and 1 KiB strings with
# one producer and one consumer, 1 MiB strings, and 4 producers x 4 consumers; small items
# once more with both processes pinned to one CPU (taskset), which shows the cost of the
# handover itself without cross-CPU cache traffic, the factor that varies most from one
# run to the next on a shared machine. Best of
# ROUNDS (default 3) alternating runs; prints items/s (MB/s for 1 MiB) and the ratios.
# The 1 KiB case also runs the "Lua floor" (see floor.lua below).
# Usage: scripts/bench/queue.sh [small-items]   (build first: scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${LUAMP_BUILD:-build}
n=${1:-200000}
rounds=${ROUNDS:-3}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

cat > "$tmp/ring.c" <<'C'
/* SPSC ring in a MAP_SHARED mapping: head and tail counters, fixed-size slots. */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
struct ring { _Alignas(64) unsigned long head; _Alignas(64) unsigned long tail; };
int main(int argc, char **argv) {
  long n = atol(argv[1]);
  /* 512 KiB of slots for small items, 1 MiB for 1 KiB ones: a bigger ring spends its
   * first pass faulting in fresh shared pages (64 MiB of 1 KiB slots ran at 0.7M/s, 1 MiB
   * at 4.2M/s), which measures the page faults, not the handover */
  size_t item = (size_t)atol(argv[2]), slots = item >= 4096 ? 8 : item >= 512 ? 1024 : 65536;
  struct ring *r = mmap(NULL, sizeof *r + slots * item, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  char *data = (char *)(r + 1), *buf = malloc(item);
  memset(buf, 'x', item);
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  pid_t p = fork();
  if (p == 0) {
    for (long i = 0; i < n; i++) {
      while (i - __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE) >= (long)slots) sched_yield();
      memcpy(data + (i % slots) * item, buf, item);
      __atomic_store_n(&r->head, i + 1, __ATOMIC_RELEASE);
    }
    _exit(0);
  }
  char *out = malloc(item);
  for (long i = 0; i < n; i++) {
    while (__atomic_load_n(&r->head, __ATOMIC_ACQUIRE) <= (unsigned long)i) sched_yield();
    memcpy(out, data + (i % slots) * item, item);
    __atomic_store_n(&r->tail, i + 1, __ATOMIC_RELEASE);
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  waitpid(p, NULL, 0);
  printf("%.0f\n", n / ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9));
  return out[0] != 'x';
}
C
cc -O2 -o "$tmp/ring" "$tmp/ring.c"

# The Lua floor for 1 KiB items: the same SPSC ring as ring.c (1 MiB of slots, spin with
# sched_yield, no locks, no checks but the length), driven from Lua through a minimal C
# module: the producer calls ring:put(s) with the same string, the consumer ring:get(),
# which pushes a new Lua string (allocation, copy, garbage). It runs in the same luamp
# binary (its Lua VM, generational GC and malloc are the ones luamp's queue runs on; the
# producer is a luamp.Process, as in q.lua), so it is the ceiling for any Lua queue
# between two processes here. Reported beside queue.1k; the goal's peer stays the raw ring.
cat > "$tmp/lfring.c" <<'C'
/* The floor for a Lua queue between two processes: the raw SPSC ring of queue.sh's
 * ring.c (a MAP_SHARED mapping, head and tail counters, 1 MiB of fixed slots, spin with
 * sched_yield), driven from Lua: put copies the string into a slot, get pushes a new
 * Lua string from it. No locks, no checks beyond the length, no blocking but spinning. */
#include <lua.h>
#include <lauxlib.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>
struct ring { _Alignas(64) unsigned long head; _Alignas(64) unsigned long tail; };
typedef struct { struct ring *r; char *data; size_t item, slots; unsigned long pnext, gnext; } ud;
static int put(lua_State *L) {
  ud *u = lua_touserdata(L, 1);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  if (len > u->item - 8) return luaL_error(L, "item too large");
  unsigned long i = u->pnext;
  while (i - __atomic_load_n(&u->r->tail, __ATOMIC_ACQUIRE) >= u->slots) sched_yield();
  char *slot = u->data + (i % u->slots) * u->item;
  memcpy(slot, &len, 8);
  memcpy(slot + 8, s, len);
  __atomic_store_n(&u->r->head, i + 1, __ATOMIC_RELEASE);
  u->pnext = i + 1;
  return 0;
}
static int get(lua_State *L) {
  ud *u = lua_touserdata(L, 1);
  unsigned long i = u->gnext;
  while (__atomic_load_n(&u->r->head, __ATOMIC_ACQUIRE) <= i) sched_yield();
  const char *slot = u->data + (i % u->slots) * u->item;
  size_t len;
  memcpy(&len, slot, 8);
  if (len > u->item - 8) return luaL_error(L, "bad length");
  lua_pushlstring(L, slot + 8, len);
  __atomic_store_n(&u->r->tail, i + 1, __ATOMIC_RELEASE);
  u->gnext = i + 1;
  return 1;
}
/* new(item_bytes, slots) -> ring; fork after this, one side puts, the other gets */
static int new(lua_State *L) {
  size_t item = (size_t)luaL_checkinteger(L, 1) + 8, slots = (size_t)luaL_checkinteger(L, 2);
  ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->r = mmap(NULL, sizeof *u->r + slots * item, PROT_READ | PROT_WRITE,
              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (u->r == MAP_FAILED) return luaL_error(L, "mmap failed");
  u->data = (char *)(u->r + 1);
  u->item = item;
  u->slots = slots;
  u->pnext = u->gnext = 0;
  luaL_setmetatable(L, "lfring");
  return 1;
}
int luaopen_lfring(lua_State *L) {
  luaL_newmetatable(L, "lfring");
  lua_newtable(L);
  lua_pushcfunction(L, put);
  lua_setfield(L, -2, "put");
  lua_pushcfunction(L, get);
  lua_setfield(L, -2, "get");
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  lua_pushcfunction(L, new);
  return 1;
}
C
cc -O2 -shared -fPIC $(pkg-config --cflags lua5.4) -o "$tmp/lfring.so" "$tmp/lfring.c"

cat > "$tmp/floor.lua" <<'L'
package.cpath = arg[2] .. "/?.so;" .. package.cpath
local luamp = require "luamp"
local n = tonumber(arg[1])
local ring = require "lfring"(1024, 1024)
local item = string.rep("x", 1024)
local t0 = luamp.time()
local p = luamp.Process{target = function() for _ = 1, n do ring:put(item) end end}
p:start()
for _ = 1, n do ring:get() end
p:join()
print(string.format("%.0f", n / (luamp.time() - t0)))
L

cat > "$tmp/q.lua" <<'L'
local luamp = require "luamp"
local case, n = arg[1], tonumber(arg[2])
local q = luamp.Queue()
local item = case == "small" and 12345 or case == "1k" and string.rep("x", 1024)
          or string.rep("x", 1 << 20)
local t0 = luamp.time()
if case == "mpmc" then
  local ps, cs = {}, {}
  for k = 1, 4 do
    ps[k] = luamp.Process{target = function() for i = 1, n // 4 do q:put(i) end end}
    cs[k] = luamp.Process{target = function() while q:get() do end end}
    ps[k]:start(); cs[k]:start()
  end
  for k = 1, 4 do ps[k]:join() end
  for k = 1, 4 do q:put(false) end
  for k = 1, 4 do cs[k]:join() end
else
  local p = luamp.Process{target = function() for _ = 1, n do q:put(item) end end}
  p:start()
  for _ = 1, n do q:get() end
  p:join()
end
print(string.format("%.0f", n / (luamp.time() - t0)))
L

cat > "$tmp/q.py" <<'P'
import multiprocessing as mp, sys, time
def produce(q, n, item):
    for _ in range(n): q.put(item)
def produce_ints(q, n):
    for i in range(n): q.put(i)
def consume(q):
    while q.get() is not None: pass
if __name__ == "__main__":
    mp.set_start_method("fork")
    case, n = sys.argv[1], int(sys.argv[2])
    q = mp.Queue()
    item = 12345 if case == "small" else b"x" * 1024 if case == "1k" else b"x" * (1 << 20)
    t0 = time.monotonic()
    if case == "mpmc":
        ps = [mp.Process(target=produce_ints, args=(q, n // 4)) for _ in range(4)]
        cs = [mp.Process(target=consume, args=(q,)) for _ in range(4)]
        for p in ps + cs: p.start()
        for p in ps: p.join()
        for _ in cs: q.put(None)
        for c in cs: c.join()
    else:
        p = mp.Process(target=produce, args=(q, n, item)); p.start()
        for _ in range(n): q.get()
        p.join()
    print("%.0f" % (n / (time.monotonic() - t0)))
P

max() { { grep . || true; } | sort -g | tail -1; }
declare -A best
cases=(small 1k 1m mpmc)
declare -A count=([small]=$n [1k]=$((n / 2)) [1m]=$((n / 200 > 200 ? n / 200 : 200)) [mpmc]=$n)
# Python is slower: fewer items keep its runs short (rates are per second either way)
declare -A pcount=([small]=$((n / 4)) [1k]=$((n / 4)) [1m]=$((n / 1000 > 50 ? n / 1000 : 50)) [mpmc]=$((n / 2)))
for ((r = 0; r < rounds; r++)); do
  for c in "${cases[@]}"; do
    best[l$c]+=$("$build/luamp" "$tmp/q.lua" "$c" "${count[$c]}")$'\n'
    best[p$c]+=$(python3 "$tmp/q.py" "$c" "${pcount[$c]}")$'\n'
  done
  best[lpinned]+=$(taskset -c 0 "$build/luamp" "$tmp/q.lua" small "$n")$'\n'
  best[ppinned]+=$(taskset -c 0 python3 "$tmp/q.py" small "$((n / 4))")$'\n'
  best[cpinned]+=$(taskset -c 0 "$tmp/ring" "$((n * 10))" 8)$'\n'
  best[csmall]+=$("$tmp/ring" "$((n * 10))" 8)$'\n'
  best[c1k]+=$("$tmp/ring" "$n" 1024)$'\n'
  best[f1k]+=$("$build/luamp" "$tmp/floor.lua" "${count[1k]}" "$tmp")$'\n'
  best[c1m]+=$("$tmp/ring" 2000 $((1 << 20)))$'\n'
done
echo "Queue throughput (items/s; 1 MiB items also in MB/s), best of $rounds runs"
printf "  %-24s %14s %14s %14s %10s %10s\n" case luamp python raw_C_ring py/luamp luamp/C
for c in "${cases[@]}" pinned; do
  l=$(max <<<"${best[l$c]}"); p=$(max <<<"${best[p$c]}"); k=$(max <<<"${best[c$c]:-}")
  awk -v c="$c" -v l="$l" -v p="$p" -v k="${k:-0}" 'BEGIN {
    names["small"] = "small items, 1P1C"; names["1k"] = "1 KiB items, 1P1C"
    names["1m"] = "1 MiB items, 1P1C"; names["mpmc"] = "small items, 4P x 4C"
    names["pinned"] = "small, 1P1C, one CPU"
    printf "  %-24s %14.0f %14.0f %14s %9.1fx %10s\n", names[c], l, p,
      (k > 0 ? sprintf("%.0f", k) : "-"), l / p, (k > 0 ? sprintf("%.3f", l / k) : "-")
    if (c == "1m") printf "  %-24s %14.0f %14.0f %14.0f   (MB/s)\n", "", l * 1.048576, p * 1.048576, k * 1.048576 }'
done
f=$(max <<<"${best[f1k]}"); l=$(max <<<"${best[l1k]}"); k=$(max <<<"${best[c1k]}")
awk -v f="$f" -v l="$l" -v k="$k" 'BEGIN {
  printf "  %-24s %14.0f %14s %14.0f %10s %10.3f   (Lua floor: the ring driven from Lua)\n", \
    "1 KiB items, Lua floor", f, "-", k, "-", f / k
  printf "  1 KiB: luamp / Lua floor = %.3f; Lua floor %.0f ns/item, luamp %.0f ns/item\n", \
    l / f, 1e9 / f, 1e9 / l }'
echo "  goals: small items 1P1C py/luamp >= 20x; 1 MiB items py/luamp >= 10x"
# machine-readable lines for scripts/bench/run.sh (queue.small_worst: luamp's worst run
# against Python's best, for the "in every run" goal)
for c in "${cases[@]}" pinned; do
  l=$(max <<<"${best[l$c]}"); p=$(max <<<"${best[p$c]}"); k=$(max <<<"${best[c$c]:-}")
  echo "RESULT name=queue.$c luamp=$l python=$p peer=${k:--} unit=items/s"
done
# queue.1k_floor: the Lua floor in luamp's column (its peer, the raw ring, as queue.1k's)
echo "RESULT name=queue.1k_floor luamp=$(max <<<"${best[f1k]}") python=- peer=$(max <<<"${best[c1k]}") unit=items/s"
lw=$({ grep . || true; } <<<"${best[lsmall]}" | sort -g | head -1)
echo "RESULT name=queue.small_worst luamp=$lw python=$(max <<<"${best[psmall]}") peer=- unit=items/s"
