#!/usr/bin/env bash
# Lock and shared-counter costs: luamp vs Python multiprocessing vs a raw C futex mutex,
# plus the cost of an empty Lua-to-C method call, all measured in this one run.
# Usage: scripts/bench/sync.sh [iterations] [counter increments per process]
# (build first: scripts/build.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-2000000}
k=${2:-100000}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# Raw C: a Drepper-style futex mutex (0 free, 1 locked, 2 contended) in shared memory.
cat > "$tmp/futex.c" <<'C'
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
typedef struct { _Atomic uint32_t w; long counter; } shared;
static void lock(_Atomic uint32_t *w) {
  uint32_t c = 0;
  if (atomic_compare_exchange_strong(w, &c, 1)) return;
  if (c != 2) c = atomic_exchange(w, 2);
  while (c != 0) {
    syscall(SYS_futex, w, FUTEX_WAIT, 2, NULL, NULL, 0);
    c = atomic_exchange(w, 2);
  }
}
static void unlock(_Atomic uint32_t *w) {
  if (atomic_exchange(w, 0) == 2) syscall(SYS_futex, w, FUTEX_WAKE, 1, NULL, NULL, 0);
}
static double now(void) {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9;
}
int main(int argc, char **argv) {
  long n = atol(argv[1]), k = atol(argv[2]);
  shared *s = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  double t = now();
  for (long i = 0; i < n; i++) { lock(&s->w); unlock(&s->w); }
  printf("%.2f\n", (now() - t) / n * 1e9);
  _Atomic long *a = (_Atomic long *)&s->counter;
  t = now();
  for (long i = 0; i < n; i++) atomic_fetch_add(a, 1);
  printf("%.2f\n", (now() - t) / n * 1e9);
  s->counter = 0;
  t = now();
  for (int p = 0; p < 2; p++) {
    if (fork() == 0) {
      for (long i = 0; i < k; i++) { lock(&s->w); s->counter++; unlock(&s->w); }
      _exit(0);
    }
  }
  while (wait(NULL) > 0) {}
  printf("%.4f\n", now() - t);
  if (s->counter != 2 * k) { fprintf(stderr, "raw C counter wrong: %ld\n", s->counter); return 1; }
  return 0;
}
C
cc -O2 -o "$tmp/futex" "$tmp/futex.c"

# The empty Lua-to-C call made as a userdata method (ud:noop()): the lock.pair floor is two of
# these plus the raw C pair. Since session 5 a luamp Lock is a table whose acquire/release
# fields are C closures, so its lookup is cheaper than this floor's: the floor stands for the
# usual userdata-method binding, not for how luamp now calls its Lock.
cat > "$tmp/noop.c" <<'C'
#include <lua.h>
#include <lauxlib.h>
static int noop(lua_State *L) { (void)L; return 0; }
int luaopen_noop(lua_State *L) {
  lua_newuserdatauv(L, 16, 0);
  lua_newtable(L);
  lua_newtable(L);
  lua_pushcfunction(L, noop);
  lua_setfield(L, -2, "noop");
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -2);
  return 1;
}
C
cc -O2 -shared -fPIC $(pkg-config --cflags lua5.4) -o "$tmp/noop.so" "$tmp/noop.c"

cat > "$tmp/bench.lua" <<'L'
package.cpath = arg[3] .. "/?.so;" .. package.cpath
local luamp = require "luamp"
local n, k = tonumber(arg[1]), tonumber(arg[2])
local clock = luamp.time
local function ns(t0) return (clock() - t0) / n * 1e9 end
local ud = require "noop"
local t0 = clock()
for _ = 1, n do ud:noop() end
print(string.format("%.2f", ns(t0)))
local lock = luamp.Lock()
t0 = clock()
for _ = 1, n do lock:acquire(); lock:release() end
print(string.format("%.2f", ns(t0)))
local v = luamp.Value("i", 0, {lock = false})
t0 = clock()
for _ = 1, n do v:add(1) end
print(string.format("%.2f", ns(t0)))
local function run2(body)
  v.value = 0
  local t = clock()
  local ps = {}
  for p = 1, 2 do
    ps[p] = luamp.Process{target = body}
    ps[p]:start()
  end
  for p = 1, 2 do ps[p]:join() end
  return clock() - t
end
local locked = run2(function()
  for _ = 1, k do lock:acquire(); v.value = v.value + 1; lock:release() end
end)
assert(v.value == 2 * k, "luamp counter wrong: " .. v.value)
print(string.format("%.4f", locked))
v = luamp.Value("i", 0)
local own = run2(function()
  for _ = 1, k do
    local l = v:get_lock()
    l:acquire(); v.value = v.value + 1; l:release()
  end
end)
assert(v.value == 2 * k, "luamp get_lock counter wrong: " .. v.value)
print(string.format("%.4f", own))
local added = run2(function() for _ = 1, k do v:add(1) end end)
assert(v.value == 2 * k, "luamp add counter wrong: " .. v.value)
print(string.format("%.4f", added))
L

cat > "$tmp/bench.py" <<'P'
import multiprocessing as mp, sys, time
def locked(lock, v, k):
    for _ in range(k):
        lock.acquire(); v.value += 1; lock.release()
def with_lock(v, k):
    for _ in range(k):
        with v.get_lock(): v.value += 1
if __name__ == "__main__":
    mp.set_start_method("fork")
    n, k = int(sys.argv[1]), int(sys.argv[2])
    lock = mp.Lock()
    t = time.perf_counter()
    for _ in range(n):
        lock.acquire(); lock.release()
    print("%.2f" % ((time.perf_counter() - t) / n * 1e9))
    for target, args, v in ((locked, (lock,), mp.Value("i", 0, lock=False)), (with_lock, (), mp.Value("i", 0))):
        t = time.perf_counter()
        ps = [mp.Process(target=target, args=args + (v, k)) for _ in range(2)]
        for p in ps: p.start()
        for p in ps: p.join()
        assert v.value == 2 * k, v.value
        print("%.4f" % (time.perf_counter() - t))
P

{ read -r c_pair; read -r c_add; read -r c_cont; } < <("$tmp/futex" "$n" "$k")
{ read -r l_call; read -r l_pair; read -r l_add; read -r l_cont; read -r l_own; read -r l_addcont; } \
  < <(build/luamp "$tmp/bench.lua" "$n" "$k" "$tmp")
{ read -r p_pair; read -r p_cont; read -r p_own; } < <(python3 "$tmp/bench.py" "$((n / 4))" "$k")

echo "uncontended, $n iterations (python: $((n / 4)))"
printf "  %-44s %10s ns\n" \
  "empty Lua-to-C method call (ud:noop())" "$l_call" \
  "raw C futex lock+unlock" "$c_pair" \
  "luamp Lock acquire+release" "$l_pair" \
  "python multiprocessing.Lock acquire+release" "$p_pair" \
  "raw C atomic add" "$c_add" \
  "luamp Value:add" "$l_add"
echo "contended: 2 processes x $k increments of a shared counter"
printf "  %-50s %8s s\n" \
  "raw C futex mutex" "$c_cont" \
  "luamp  v:get_lock() around v.value = v.value + 1" "$l_own" \
  "python with v.get_lock(): v.value += 1" "$p_own" \
  "luamp  Lock + Value{lock=false}" "$l_cont" \
  "python Lock + Value(lock=False)" "$p_cont" \
  "luamp  v:add(1), no lock" "$l_addcont"
awk -v call="$l_call" -v c="$c_pair" -v l="$l_pair" -v p="$p_pair" -v lc="$l_cont" \
    -v pc="$p_cont" -v lo="$l_own" -v po="$p_own" -v cc="$c_cont" 'BEGIN {
  printf "  luamp pair / (2 empty calls + raw C pair)   = %.2fx  (goal <= 1.0x)\n", l / (2 * call + c)
  printf "  python / luamp, uncontended pair            = %.2fx  (goal > 1x)\n", p / l
  printf "  python / luamp, counter under Value lock    = %.1fx  (goal >= 10x)\n", po / lo
  printf "  python / luamp, counter under a Lock        = %.1fx\n", pc / lc
  printf "  luamp / raw C, counter under a Lock         = %.1fx\n", lc / cc }'
# machine-readable lines for scripts/bench/run.sh
awk -v call="$l_call" -v c="$c_pair" 'BEGIN { printf "%.2f\n", 2 * call + c }' | {
  read -r floor
  echo "RESULT name=lock.pair luamp=$l_pair python=$p_pair peer=$floor unit=ns"
}
echo "RESULT name=counter.get_lock luamp=$l_own python=$p_own peer=$c_cont unit=s"
echo "RESULT name=counter.lock luamp=$l_cont python=$p_cont peer=$c_cont unit=s"
echo "RESULT name=counter.add luamp=$l_addcont python=- peer=$c_cont unit=s"
