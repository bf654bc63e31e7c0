/*
 * pool.c — the few system calls the Pool (lua/luamp/pool.lua) needs that no other
 * concept owns: whether stderr is a terminal (the progress line is drawn only then) and
 * the worker's setup (workers ignore SIGINT: Ctrl-C reaches the whole foreground
 * process group, and only the parent should act on it — it terminates the pool) — plus
 * two table helpers for the hot path: Lua cannot make a table of a known size, and
 * growing a table of a million results one doubling at a time costs more than the work.
 *
 * Big blocks on huge pages. A map's result table of a million items is a 16 MB block
 * written in full at once; fresh from malloc it comes in 4 KiB pages, each a page fault,
 * and on a virtual machine a fault costs tens of microseconds (measured here: 3,900
 * faults and 200 ms for 16 MB, against 25 ms on 2 MiB pages). So the first table_new of a
 * big table puts a thin layer over the state's allocator: a block of BIG_BLOCK bytes or
 * more (1.75 MiB) gets a mapping of its own, starting at a 2 MiB boundary, with MADV_HUGEPAGE (the
 * kernel's "madvise" mode then backs every whole 2 MiB of it with one huge page), and goes
 * back to the kernel when freed; every other block goes to the allocator as before. The
 * layer knows its blocks by address (an open-addressing set); it frees itself on the
 * state's last call (lua_close frees the main thread's block last). The layer is put on
 * by a table_new of LUAMP_POPULATE_MIN bytes or more (a Pool(8) worker's chunk tables are
 * 500 KB); a block from that size up to BIG_BLOCK still comes from the allocator, but
 * its new part is mapped at once (luamp_populate: one system call instead of a fault per
 * 4 KiB page).
 */
#define _GNU_SOURCE 1   /* dladdr */
#include <dlfcn.h>
#include <malloc.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

/* isatty(fd) -> boolean */
static int l_isatty(lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  lua_pushboolean(L, fd >= 0 && fd <= INT32_MAX && isatty((int)fd));
  return 1;
}

/* worker_setup(): SIGINT ignored, and a Ctrl-C that reached this process between fork
 * and now is forgotten. Freed memory is kept rather than handed back to the kernel: a
 * worker reuses its chunk buffers over and over, and faulting fresh pages in costs more
 * than the work on many virtual machines. */
static int l_worker_setup(lua_State *L) {
  (void)L;
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  struct sigaction sa = {.sa_handler = SIG_IGN};
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  luamp_take_interrupt();
  return 0;
}

/* own_heap(): a worker about to run its first big chunk makes its copy of the malloc
 * heap it shares with its parent (copy-on-write since the fork) now, in one call, if the
 * heap is small. Why: the chunk's tables start the worker's first garbage collection,
 * whose marking writes into every object the fork left it, so every page of the heap
 * would be copied anyway, each by a fault of its own (about 90 in a fresh Pool worker,
 * 14 us each here, several times that under load; MADV_POPULATE_WRITE copies them at
 * ~1.5 us). An idle worker stays as small as before; a big heap (over OWN_HEAP_MAX) is
 * left to the faults, which copy only what the collector touches. */
#define OWN_HEAP_MAX ((uintptr_t)8 << 20)
static int l_own_heap(lua_State *L) {
  (void)L;
  FILE *f = fopen("/proc/self/maps", "re");
  if (!f) return 0;
  char line[512];
  uintptr_t lo = 0, hi = 0;
  while (fgets(line, sizeof line, f)) {
    if (!strstr(line, "[heap]")) continue;
    unsigned long a, b;
    if (sscanf(line, "%lx-%lx", &a, &b) == 2) lo = a, hi = b;
    break;
  }
  fclose(f);
  if (hi > lo && hi - lo <= OWN_HEAP_MAX) luamp_populate((void *)lo, hi - lo, 1);
  return 0;
}

#define HUGE_PAGE ((size_t)2 << 20)
#define BIG_BLOCK (HUGE_PAGE / 8 * 7)   /* (rounded up to a huge page: see big_map) */

typedef struct big_block { void *p; size_t maplen; } big_block;

typedef struct big_alloc {
  lua_Alloc f;            /* the state's allocator underneath */
  void *ud;
  void *last;             /* the main thread's block: freed by the state's last call */
  big_block *set;         /* open addressing (linear probing) by address; cap a power of 2 */
  size_t cap, n;
} big_alloc;

static size_t big_hash(const void *p, size_t cap) {
  return (size_t)(((uintptr_t)p >> 21) * 0x9E3779B97F4A7C15ull) & (cap - 1);
}

static size_t big_find(const big_alloc *b, const void *p) {
  if (!b->cap) return SIZE_MAX;
  for (size_t i = big_hash(p, b->cap);; i = (i + 1) & (b->cap - 1)) {
    if (b->set[i].p == p) return i;
    if (!b->set[i].p) return SIZE_MAX;
  }
}

static int big_insert(big_alloc *b, void *p, size_t maplen) {
  if (2 * (b->n + 1) > b->cap) {
    size_t cap = b->cap ? 2 * b->cap : 16;
    big_block *set = calloc(cap, sizeof *set);
    if (!set) return -1;
    for (size_t i = 0; i < b->cap; i++) {
      if (!b->set[i].p) continue;
      size_t j = big_hash(b->set[i].p, cap);
      while (set[j].p) j = (j + 1) & (cap - 1);
      set[j] = b->set[i];
    }
    free(b->set);
    b->set = set;
    b->cap = cap;
  }
  size_t j = big_hash(p, b->cap);
  while (b->set[j].p) j = (j + 1) & (b->cap - 1);
  b->set[j].p = p;
  b->set[j].maplen = maplen;
  b->n++;
  return 0;
}

/* Removes slot i, moving later members of its probe run back (no tombstones). */
static void big_remove(big_alloc *b, size_t i) {
  size_t mask = b->cap - 1;
  b->set[i].p = NULL;
  b->n--;
  for (size_t j = (i + 1) & mask; b->set[j].p; j = (j + 1) & mask) {
    size_t h = big_hash(b->set[j].p, b->cap);
    /* j's entry may fill the hole at i if its home is not in (i, j] (cyclically) */
    if ((j > i && (h <= i || h > j)) || (j < i && h <= i && h > j)) {
      b->set[i] = b->set[j];
      b->set[j].p = NULL;
      i = j;
    }
  }
}

/* A mapping of at least n bytes starting at a 2 MiB boundary, asked for huge pages. Only
 * whole huge pages of it get one: it runs to the next 2 MiB boundary when that wastes at
 * most an eighth (a million 16-byte slots are 15.3 MiB: their last 1.3 MiB would
 * otherwise fault in 4 KiB at a time). */
static void *big_map(size_t n, size_t *maplen) {
  if (n > SIZE_MAX - 4 * HUGE_PAGE) return NULL;
  size_t len = (n + 4095) & ~(size_t)4095;
  size_t whole = (n + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
  if (whole - len <= len / 8) len = whole;
  size_t span = len + HUGE_PAGE;
  char *r = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (r == MAP_FAILED) return NULL;
  char *a = (char *)(((uintptr_t)r + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
  if (a > r) munmap(r, (size_t)(a - r));
  if (a + len < r + span) munmap(a + len, (size_t)(r + span - (a + len)));
#ifdef MADV_HUGEPAGE
  madvise(a, len, MADV_HUGEPAGE);
#endif
  *maplen = len;
  return a;
}

static void *big_alloc_f(void *ud, void *ptr, size_t osize, size_t nsize) {
  big_alloc *b = ud;
  size_t i = ptr && osize >= BIG_BLOCK ? big_find(b, ptr) : SIZE_MAX;
  if (i == SIZE_MAX) {                                 /* not ours */
    if (nsize < BIG_BLOCK || (ptr && nsize <= osize)) {
      void *r = b->f(b->ud, ptr, osize, nsize);
      if (r && nsize >= LUAMP_POPULATE_MIN && (!ptr || nsize > osize)) {
        size_t had = ptr ? osize : 0;   /* (without ptr, osize is a type tag) */
        luamp_populate((char *)r + had, nsize - had, 1);
      }
      if (ptr == b->last && nsize == 0) {              /* lua_close is done: so are we */
        free(b->set);
        free(b);
      }
      return r;
    }
    size_t maplen;
    void *p = big_map(nsize, &maplen);
    if (p && big_insert(b, p, maplen) < 0) {
      munmap(p, maplen);
      p = NULL;
    }
    if (!p) return b->f(b->ud, ptr, osize, nsize);    /* no mapping: as before */
    if (ptr) {
      memcpy(p, ptr, osize);
      b->f(b->ud, ptr, osize, 0);
    }
    return p;
  }
  size_t maplen = b->set[i].maplen;
  if (nsize == 0) {
    big_remove(b, i);
    munmap(ptr, maplen);
    return NULL;
  }
  if (nsize >= BIG_BLOCK && nsize <= maplen) return ptr;   /* fits where it is */
  void *np;
  if (nsize >= BIG_BLOCK) {
    size_t nl;
    np = big_map(nsize, &nl);
    if (!np) return NULL;
    if (big_insert(b, np, nl) < 0) {
      munmap(np, nl);
      return NULL;
    }
  } else {
    np = b->f(b->ud, NULL, 0, nsize);
    if (!np) return NULL;
  }
  memcpy(np, ptr, osize < nsize ? osize : nsize);
  big_remove(b, big_find(b, ptr));                     /* (the insert may have moved it) */
  munmap(ptr, maplen);
  return np;
}

/* Puts the big-block layer over L's allocator, once. The state calls it until its very
 * end, after lua_close has unloaded the C modules (package's _CLIBS): loaded as a module,
 * luamp pins itself first (RTLD_NODELETE), or goes without the layer. Linked into the
 * program, it is never unloaded. */
static void big_blocks_on(lua_State *L) {
  void *ud;
  if (lua_getallocf(L, &ud) == big_alloc_f) return;
  Dl_info info;
  if (dladdr((void *)big_alloc_f, &info) && info.dli_fname) {
    void *self = dlopen(NULL, RTLD_LAZY);
    void *lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD | RTLD_NODELETE);
    int in_program = 0;
    if (!lib) {
      /* not a library of its own: in the program, if the program has the symbol */
      in_program = self && dlsym(self, "luaopen_luamp") != NULL;
    }
    if (self) dlclose(self);
    if (!lib && !in_program) return;
    /* lib stays open: with RTLD_NODELETE it is never unloaded anyway */
  }
  big_alloc *b = calloc(1, sizeof *b);
  if (!b) return;                                      /* then without it */
  b->f = lua_getallocf(L, &b->ud);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  b->last = lua_getextraspace(lua_tothread(L, -1));
  lua_pop(L, 1);
  lua_setallocf(L, big_alloc_f, b);
}

/* table_new(narr) -> a table with room for narr array items */
static int l_table_new(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  if (n < 0 || n > (1 << 26)) n = 0;   /* a hint only: beyond this, let it grow */
  if ((size_t)n >= LUAMP_POPULATE_MIN / 16) big_blocks_on(L);
  lua_createtable(L, (int)n, 1);
  return 1;
}

/* table_slice(t, i, j, [dst, dst_n]) -> {t[i], ..., t[j]} (holes kept as holes), sized up
 * front; or refills dst (whose items 1..dst_n are cleared first where not overwritten),
 * so that the chunks of a big map reuse one table instead of faulting in fresh memory. */
static int l_table_slice(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer i = luaL_checkinteger(L, 2), j = luaL_checkinteger(L, 3);
  if (i < 1 || j < i - 1 || j - i >= INT32_MAX) luamp_raise(L, "Value", "table_slice: bad range");
  lua_Integer n = j - i + 1;
  if (lua_istable(L, 4)) {
    lua_Integer old = luaL_optinteger(L, 5, 0);
    lua_settop(L, 4);
    for (lua_Integer k = n + 1; k <= old; k++) {
      lua_pushnil(L);
      lua_rawseti(L, 4, k);
    }
  } else {
    lua_settop(L, 3);
    lua_createtable(L, n > (1 << 26) ? 0 : (int)n, 0);
  }
  for (lua_Integer k = i; k <= j; k++) {
    lua_geti(L, 1, k);
    lua_rawseti(L, -2, k - i + 1);
  }
  return 1;
}

int luamp_open_pool(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"isatty", l_isatty},
    {"worker_setup", l_worker_setup},
    {"own_heap", l_own_heap},
    {"table_new", l_table_new},
    {"table_slice", l_table_slice},
    {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return luamp_open_ring(L);
}
