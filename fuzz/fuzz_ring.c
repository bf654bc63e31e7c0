/*
 * fuzz_ring.c — libFuzzer target for the consumer side of the Pool's shared-memory ring
 * (ring.c's take/has/put on positions and records another process wrote).
 *
 * A worker shares the ring's pages with the parent, so everything in them is a claim:
 * both positions, every record length, every marker. The input becomes the state of one
 * direction of a fresh ring, written straight into the shared mapping as a scribbling
 * peer would:
 *   byte 0      bit 0: the direction; bit 1: tail = head + (bytes 9..12 % (cap + 64)),
 *               else bytes 9..16 are the tail as they are; bit 2: try a put afterwards;
 *               bit 3: take with take_decoded (records decoded where they lie); bit 4:
 *               into a table (dst, 1, n) with n = bits 6..7, and at = 5 if bit 5
 *   bytes 1..8  head (little-endian)
 *   bytes 9..16 tail, or its distance from head
 *   the rest    the data area's bytes from head's offset on (wrapping at the end)
 * Then take() (or take_decoded()) runs until the ring is empty or says it is garbled.
 * Every answer of take must be a string no longer than the ring's capacity, a marker
 * (false and a tag), nil, or nil and a message; the consumer's position may only move
 * forward and never past the tail (a record or marker may move it past PADs first; empty
 * or garbled leaves it). take_decoded answers a value, its tag and true, a marker, nil,
 * or nil and a message; a record that does not decode is consumed (as one that does),
 * garbled positions are not. Any crash, sanitizer report, hang or broken rule is a bug.
 *
 * take_decoded decodes trusted (luamp's own processes write the ring): its payloads may
 * carry Lua bytecode, which Lua does not verify, and module names, which it requires. So
 * that scribbled payloads reach every other path of the decoder without handing garbage
 * to Lua's undump, this file interposes lua_load: binary chunks are refused (a decode
 * error, as any other), text chunks go to the real one; and require finds only what is
 * loaded already (empty package paths).
 *
 * The layout written here mirrors ring.c's header; setup checks the magic and capacity
 * at the offsets it assumes, so a change of layout stops the fuzzer at once.
 */
#include <dirent.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <lualib.h>

#include "internal.h"

#define RING_CAP (4u << 20)
#define HDR_SIZE 4096u
#define MAGIC 0x676e6952706d6c00ULL
/* offsets in the header of direction d's tail and head (64-byte aligned fields) */
#define TAIL_OFF(d) (64u + (d) * 192u)
#define HEAD_OFF(d) (TAIL_OFF(d) + 64u)
#define SLEEPING_OFF(d) (TAIL_OFF(d) + 128u)

/* Lua's own lua_load, for text chunks (see the header). */
typedef int (*lua_load_fn)(lua_State *, lua_Reader, void *, const char *, const char *);

int lua_load(lua_State *Ls, lua_Reader reader, void *data, const char *chunkname,
             const char *mode) {
  static lua_load_fn real;
  if (!real) real = (lua_load_fn)dlsym(RTLD_NEXT, "lua_load");
  if (!real) abort();
  if (mode && strcmp(mode, "b") == 0) {
    lua_pushliteral(Ls, "fuzz_ring: bytecode is not loaded");
    return LUA_ERRSYNTAX;
  }
  return real(Ls, reader, data, chunkname, mode);
}

static lua_State *L;
static unsigned char *map;
static int ring_ref;

static int find_ring_fd(void) {
  DIR *dir = opendir("/proc/self/fd");
  if (!dir) return -1;
  int best = -1;
  struct dirent *e;
  while ((e = readdir(dir))) {
    char path[64], target[128];
    snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
    ssize_t n = readlink(path, target, sizeof target - 1);
    if (n <= 0) continue;
    target[n] = 0;
    if (strstr(target, "memfd:luamp-pool-ring") && atoi(e->d_name) > best) best = atoi(e->d_name);
  }
  closedir(dir);
  return best;
}

static void setup(void) {
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  if (luaL_dostring(L, "return require('luamp._core').ring_new()") != LUA_OK) {
    fprintf(stderr, "fuzz_ring setup: %s\n", lua_tostring(L, -1));
    abort();
  }
  ring_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (luaL_dostring(L, "package.path, package.cpath = '', ''") != LUA_OK) abort();
  int fd = find_ring_fd();
  if (fd < 0) { fprintf(stderr, "fuzz_ring: no ring memfd\n"); abort(); }
  map = mmap(NULL, HDR_SIZE + 2 * (size_t)RING_CAP, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) { perror("fuzz_ring: mmap"); abort(); }
  uint64_t magic;
  uint32_t cap;
  memcpy(&magic, map, 8);
  memcpy(&cap, map + 8, 4);
  uint32_t asleep0, asleep1;   /* a new ring: only the parent's direction (1) "sleeps" */
  memcpy(&asleep0, map + SLEEPING_OFF(0), 4);
  memcpy(&asleep1, map + SLEEPING_OFF(1), 4);
  if (magic != MAGIC || cap != RING_CAP || asleep0 != 0 || asleep1 != 1) {
    fprintf(stderr, "fuzz_ring: ring.c's header layout changed; update this file\n");
    abort();
  }
}

static uint64_t get64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
  return v;
}

static uint64_t load_pos(size_t off) {
  uint64_t v;
  memcpy(&v, map + off, 8);
  return v;
}

/* ring:method(d, ...) with nargs extra arguments already pushed; leaves nres results */
static int call(const char *method, int d, int nargs, int nres) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, ring_ref);
  lua_getfield(L, -1, method);
  lua_insert(L, -2);
  lua_pushinteger(L, d);
  int first = lua_gettop(L) - 2;
  for (int i = 0; i < nargs; i++) lua_pushvalue(L, first - nargs + i);
  return lua_pcall(L, 2 + nargs, nres, 0);
}

/* take_decoded until the ring is empty or garbled, checking each answer (see the
 * header); into: with a fresh destination table, n items from position 1. */
static void take_decoded_all(int d, uint64_t tail, int into, int at, int nitems) {
  int base = lua_gettop(L);
  for (int n = 0; n < 4096; n++) {
    uint64_t before = load_pos(HEAD_OFF(d));
    int nargs = 0;
    if (into) {
      lua_newtable(L);
      lua_pushinteger(L, 1);
      lua_pushinteger(L, nitems);
      lua_pushinteger(L, at);
      nargs = 4;
    }
    if (call("take_decoded", d, nargs, 3) != LUA_OK) {
      fprintf(stderr, "fuzz_ring: take_decoded raised: %s\n", luaL_tolstring(L, -1, NULL));
      abort();
    }
    uint64_t after = load_pos(HEAD_OFF(d));
    int t1 = lua_type(L, -3), t2 = lua_type(L, -2), t3 = lua_type(L, -1);
    int consumed = after != before && after - before <= tail - before;
    if (t3 == LUA_TBOOLEAN && lua_toboolean(L, -1)) {          /* a value, its tag, true */
      if (t2 != LUA_TNUMBER || !consumed) abort();
      if (into && !at && !(t1 == LUA_TBOOLEAN && lua_toboolean(L, -3))) abort();
    } else if (t1 == LUA_TBOOLEAN && !lua_toboolean(L, -3)) {  /* a marker */
      if (t2 != LUA_TNUMBER || t3 != LUA_TNIL || !consumed || after - before < 8) abort();
    } else if (t1 == LUA_TNIL && t3 == LUA_TNIL) {
      size_t ml;
      const char *msg = t2 == LUA_TSTRING ? lua_tolstring(L, -2, &ml) : NULL;
      if (t2 != LUA_TNIL && !msg) abort();
      static const char undecodable[] = "pool ring: a record does not decode";
      if (msg && strncmp(msg, undecodable, sizeof undecodable - 1) == 0) {
        if (!consumed) abort();                   /* consumed: the next take goes on */
        lua_settop(L, base);
        continue;
      }
      if (after != before) abort();               /* empty or garbled: nothing consumed */
      lua_settop(L, base);
      break;
    } else {
      abort();
    }
    lua_settop(L, base);
  }
  lua_settop(L, base);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!L) setup();
  if (size < 17) return 0;
  int d = data[0] & 1, relative = data[0] & 2, try_put = data[0] & 4, decoded = data[0] & 8;
  int into = data[0] & 16, at = data[0] & 32 ? 5 : 0, nitems = data[0] >> 6;
  uint64_t head = get64(data + 1), tail = get64(data + 9);
  if (relative) tail = head + (uint32_t)tail % (RING_CAP + 64);
  data += 17, size -= 17;
  unsigned char *area = map + HDR_SIZE + (size_t)d * RING_CAP;
  size_t off = (size_t)(head % RING_CAP);
  for (size_t i = 0; i < size && i < RING_CAP; i++) area[(off + i) % RING_CAP] = data[i];
  memcpy(map + HEAD_OFF(d), &head, 8);
  memcpy(map + TAIL_OFF(d), &tail, 8);

  int base = lua_gettop(L);
  if (decoded) {
    take_decoded_all(d, tail, into, at, nitems);
  } else for (int n = 0; n < 4096; n++) {
    uint64_t before = load_pos(HEAD_OFF(d));
    if (call("take", d, 0, 2) != LUA_OK) {
      fprintf(stderr, "fuzz_ring: take raised: %s\n", lua_tostring(L, -1));
      abort();
    }
    int t1 = lua_type(L, -2), t2 = lua_type(L, -1);
    uint64_t after = load_pos(HEAD_OFF(d));
    if (t1 == LUA_TSTRING) {
      if (lua_rawlen(L, -2) > RING_CAP || t2 != LUA_TNUMBER) abort();
      if (after - before == 0 || after - before > tail - before) abort();   /* positions wrap */
    } else if (t1 == LUA_TBOOLEAN && !lua_toboolean(L, -2)) {
      if (t2 != LUA_TNUMBER || after - before < 8 || after - before > tail - before) abort();
    } else if (t1 == LUA_TNIL) {
      if (after != before) abort();          /* empty or garbled: nothing consumed */
      if (t2 != LUA_TNIL && t2 != LUA_TSTRING) abort();
      lua_settop(L, base);
      break;
    } else {
      abort();
    }
    lua_settop(L, base);
  }
  if (call("has", d, 0, 1) != LUA_OK) abort();
  lua_settop(L, base);
  if (try_put) {
    /* the producer side reads the consumer's position: garbled ones raise Value */
    lua_pushlstring(L, "payload", 7);
    int rc = call("put", d, 1, 1);
    if (rc != LUA_OK) {
      lua_getfield(L, -1, "kind");
      const char *k = lua_tostring(L, -1);
      if (!k || strcmp(k, "Value") != 0) {
        lua_pop(L, 1);
        fprintf(stderr, "fuzz_ring: put raised a non-Value error: %s\n", luaL_tolstring(L, -1, NULL));
        abort();
      }
    }
    lua_settop(L, base);
  }
  static unsigned runs;
  if (++runs % 64 == 0) lua_gc(L, LUA_GCCOLLECT);     /* taken strings are up to 4 MiB */
  /* leave the ring empty and consistent for the next input */
  uint64_t zero = 0;
  memcpy(map + HEAD_OFF(d), &zero, 8);
  memcpy(map + TAIL_OFF(d), &zero, 8);
  return 0;
}
