/*
 * shared.c — Value and Array (typed numbers in the shared arena) and SharedMemory
 * (a named POSIX shared memory block).
 *
 * A Value or Array is a block of the arena (arena.c): a small header naming its
 * typecode and length, then the elements. The header lives in shared memory so that a
 * handle decoded in another process learns the shape from the object itself, never from
 * the message. Each element is read and written with one relaxed atomic access of its
 * natural width: a single read or assignment is never torn, and `add`/`cas` are
 * compare-and-swap loops, atomic without any lock. The optional lock (an RLock by
 * default, as in Python) is only for compound updates such as `v.value = v.value + 1`;
 * it rides along as the userdata's user value.
 *
 * Numbers are checked against the typecode: integers must fit (storing 300 in "b"
 * raises Value, a float needs an exact integer value), and a finite double too large for
 * "f" raises too. Unsigned 64-bit values above math.maxinteger read back as floats.
 *
 * SharedMemory is the one object with a name in /dev/shm, chosen by the user: shm_open,
 * mmap, and the fd closed at once (the mapping keeps the memory). Only unlink removes
 * the name; closing or collecting a handle merely unmaps this process's view.
 */
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

/* ---- typecodes ------------------------------------------------------------------------ */

enum { SIGNED, UNSIGNED, FLOAT };

typedef struct tcode {
  char code;
  uint8_t size;
  uint8_t kind;
  const char *names;        /* readable aliases, space separated */
} tcode;

static const tcode tcodes[] = {
  {'b', 1, SIGNED, "byte int8 char schar"},
  {'B', 1, UNSIGNED, "ubyte uint8 uchar"},
  {'h', 2, SIGNED, "short int16"},
  {'H', 2, UNSIGNED, "ushort uint16"},
  {'i', 4, SIGNED, "int int32"},
  {'I', 4, UNSIGNED, "uint uint32"},
  {'l', sizeof(long), SIGNED, "long"},
  {'L', sizeof(long), UNSIGNED, "ulong"},
  {'q', 8, SIGNED, "longlong int64"},
  {'Q', 8, UNSIGNED, "ulonglong uint64"},
  {'f', 4, FLOAT, "float"},
  {'d', 8, FLOAT, "double"},
};
#define NCODES (sizeof tcodes / sizeof *tcodes)

static int has_word(const char *list, const char *w, size_t len) {
  for (const char *p = list; *p;) {
    const char *e = strchr(p, ' ');
    size_t n = e ? (size_t)(e - p) : strlen(p);
    if (n == len && memcmp(p, w, len) == 0) return 1;
    if (!e) break;
    p = e + 1;
  }
  return 0;
}

static const tcode *code_by_char(char c) {
  for (size_t i = 0; i < NCODES; i++)
    if (tcodes[i].code == c) return &tcodes[i];
  return NULL;
}

static const tcode *check_tcode(lua_State *L, int idx) {
  size_t len;
  const char *s = lua_type(L, idx) == LUA_TSTRING ? lua_tolstring(L, idx, &len) : NULL;
  if (s) {
    if (len == 1 && code_by_char(s[0])) return code_by_char(s[0]);
    for (size_t i = 0; i < NCODES; i++)
      if (has_word(tcodes[i].names, s, len)) return &tcodes[i];
    luamp_raise(L, "Value", "unknown typecode '%s' (expected one of b B h H i I l L q Q f d, "
                "or a name such as \"int\" or \"double\")", s);
  }
  luamp_raise(L, "Value", "typecode must be a string, got %s", luaL_typename(L, idx));
}

/* Raw bits of one element, read atomically. */
static uint64_t load_bits(const tcode *tc, const char *p) {
  switch (tc->size) {
    case 1: return __atomic_load_n((const uint8_t *)p, __ATOMIC_RELAXED);
    case 2: return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
    case 4: return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
    default: return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED);
  }
}

static void store_bits(const tcode *tc, char *p, uint64_t v) {
  switch (tc->size) {
    case 1: __atomic_store_n((uint8_t *)p, (uint8_t)v, __ATOMIC_RELAXED); break;
    case 2: __atomic_store_n((uint16_t *)p, (uint16_t)v, __ATOMIC_RELAXED); break;
    case 4: __atomic_store_n((uint32_t *)p, (uint32_t)v, __ATOMIC_RELAXED); break;
    default: __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELAXED); break;
  }
}

/* Replaces `expect` with `v`; on failure *expect gets the current bits. */
static int cas_bits(const tcode *tc, char *p, uint64_t *expect, uint64_t v) {
  int ok;
  switch (tc->size) {
    case 1: {
      uint8_t e = (uint8_t)*expect;
      ok = __atomic_compare_exchange_n((uint8_t *)p, &e, (uint8_t)v, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
      *expect = e;
      return ok;
    }
    case 2: {
      uint16_t e = (uint16_t)*expect;
      ok = __atomic_compare_exchange_n((uint16_t *)p, &e, (uint16_t)v, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
      *expect = e;
      return ok;
    }
    case 4: {
      uint32_t e = (uint32_t)*expect;
      ok = __atomic_compare_exchange_n((uint32_t *)p, &e, (uint32_t)v, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
      *expect = e;
      return ok;
    }
    default:
      return __atomic_compare_exchange_n((uint64_t *)p, expect, v, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  }
}

/* Element bits as a number: exact for every integer type (via __int128) and floats. */
typedef struct num { int is_float; __int128 i; double f; } num;

static num decode(const tcode *tc, uint64_t bits) {
  num n = {0, 0, 0};
  if (tc->kind == FLOAT) {
    n.is_float = 1;
    if (tc->size == 4) {
      uint32_t b = (uint32_t)bits;
      float f;
      memcpy(&f, &b, 4);
      n.f = f;
    } else {
      memcpy(&n.f, &bits, 8);
    }
  } else if (tc->kind == UNSIGNED) {
    n.i = (__int128)bits;
  } else {
    int shift = 64 - 8 * tc->size;
    n.i = (__int128)((int64_t)(bits << shift) >> shift);
  }
  return n;
}

static __int128 int_min(const tcode *tc) {
  return tc->kind == UNSIGNED ? 0 : -((__int128)1 << (8 * tc->size - 1));
}

static __int128 int_max(const tcode *tc) {
  if (tc->kind == UNSIGNED) return ((__int128)1 << (8 * tc->size)) - 1;
  return ((__int128)1 << (8 * tc->size - 1)) - 1;
}

/* Encodes n for tc; returns NULL or a reason it does not fit. */
static const char *encode(const tcode *tc, num n, uint64_t *bits) {
  if (tc->kind == FLOAT) {
    double d = n.is_float ? n.f : (double)n.i;
    if (tc->size == 4) {
      if (isfinite(d) && fabs(d) > FLT_MAX) return "out of range for a float";
      float f = (float)d;
      uint32_t b;
      memcpy(&b, &f, 4);
      *bits = b;
    } else {
      memcpy(bits, &d, 8);
    }
    return NULL;
  }
  __int128 i;
  if (n.is_float) {
    if (!isfinite(n.f) || n.f != floor(n.f)) return "has no integer representation";
    if (fabs(n.f) >= 0x1p100) return "out of range";
    i = (__int128)n.f;
  } else {
    i = n.i;
  }
  if (i < int_min(tc) || i > int_max(tc)) return "out of range";
  *bits = (uint64_t)i;
  return NULL;
}

static num check_num(lua_State *L, int idx, const char *what) {
  num n = {0, 0, 0};
  if (lua_type(L, idx) != LUA_TNUMBER)
    luamp_raise(L, "Value", "%s must be a number, got %s", what, luaL_typename(L, idx));
  if (lua_isinteger(L, idx)) n.i = lua_tointeger(L, idx);
  else { n.is_float = 1; n.f = lua_tonumber(L, idx); }
  return n;
}

static uint64_t check_elem(lua_State *L, int idx, const tcode *tc, const char *what) {
  uint64_t bits;
  num n = check_num(L, idx, what);
  const char *why = encode(tc, n, &bits);
  if (why) {
    lua_pushvalue(L, idx);
    luamp_raise(L, "Value", "%s %s %s for typecode '%c'", what, luaL_tolstring(L, -1, NULL), why, tc->code);
  }
  return bits;
}

static void push_num(lua_State *L, num n) {
  if (n.is_float) lua_pushnumber(L, n.f);
  else if (n.i > LUA_MAXINTEGER) lua_pushnumber(L, (double)n.i);
  else lua_pushinteger(L, (lua_Integer)n.i);
}

static void push_elem(lua_State *L, const tcode *tc, const char *p) {
  push_num(L, decode(tc, load_bits(tc, p)));
}

/* ---- Value and Array ------------------------------------------------------------------ */

#define VALUE_MAGIC 0x65756c61566d756cULL
#define ARRAY_MAGIC 0x7961727241706d75ULL

typedef struct shared_hdr {
  uint32_t code;
  uint32_t pad;
  uint64_t n;
} shared_hdr;              /* 16 bytes; the elements follow */

typedef struct shared_ud {
  uint64_t magic;
  char *data;              /* first element; NULL once closed */
  const tcode *tc;
  uint64_t n;
  const void *value_key;   /* this state's interned "value" (see l_value_index) */
  const void *get_lock_key;  /* and "get_lock" and "add" (kept alive as keys of the */
  const void *add_key;       /* methods table) */
  unsigned int_size;       /* 4 or 8 for a signed integer typecode of that size (the usual
                            * counters: their hot paths skip the general codec), else 0 */
  luamp_ref ref;
} shared_ud;

static inline shared_ud *to_shared(lua_State *L, int idx, uint64_t magic, int open) {
  shared_ud *u = lua_touserdata(L, idx);
  const char *what = magic == VALUE_MAGIC ? "Value" : "Array";
  if (!u || lua_rawlen(L, idx) != sizeof *u || u->magic != magic)
    luamp_raise(L, "Value", "expected a %s, got %s", what, luaL_typename(L, idx));
  if (open && !u->data) luamp_raise(L, "Value", "%s is closed", what);
  return u;
}

static shared_ud *new_shared_ud(lua_State *L, uint64_t magic) {
  shared_ud *u = lua_newuserdatauv(L, sizeof *u, 1);
  memset(u, 0, sizeof *u);
  u->magic = magic;
  lua_pushliteral(L, "value");
  u->value_key = lua_topointer(L, -1);
  lua_pop(L, 1);
  lua_pushliteral(L, "get_lock");
  u->get_lock_key = lua_topointer(L, -1);
  lua_pop(L, 1);
  lua_pushliteral(L, "add");
  u->add_key = lua_topointer(L, -1);
  lua_pop(L, 1);
  luaL_setmetatable(L, magic == VALUE_MAGIC ? "luamp.Value" : "luamp.Array");
  return u;
}

/* The shape of the elements at data, once they are known to fit the block. */
static void set_shape(shared_ud *u, const tcode *tc, uint64_t n, char *data) {
  u->tc = tc;
  u->n = n;
  u->int_size = tc->kind == SIGNED && (tc->size == 4 || tc->size == 8) ? tc->size : 0;
  u->data = data;
}

static void set_lock(lua_State *L, int lock_idx) {
  lua_pushvalue(L, lock_idx);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_pushboolean(L, 0);
  }
  lua_setiuservalue(L, -2, 1);
}

/* Allocates n elements of tc in a fresh userdata (on the stack top). */
static shared_ud *alloc_shared(lua_State *L, uint64_t magic, const tcode *tc, uint64_t n) {
  if (n > ((uint64_t)1 << 40) / tc->size) luamp_raise(L, "Value", "array too large: %llu elements", (unsigned long long)n);
  shared_ud *u = new_shared_ud(L, magic);
  shared_hdr *h = luamp_ref_alloc(L, &u->ref, magic == VALUE_MAGIC ? LUAMP_OBJ_VALUE : LUAMP_OBJ_ARRAY,
                                  sizeof *h + n * tc->size);
  h->code = (uint32_t)tc->code;
  h->n = n;
  set_shape(u, tc, n, (char *)(h + 1));
  return u;
}

/* value_new(typecode, init, lock|false) */
static int l_value_new(lua_State *L) {
  const tcode *tc = check_tcode(L, 1);
  uint64_t bits = 0;
  if (!lua_isnoneornil(L, 2)) bits = check_elem(L, 2, tc, "initial value");
  shared_ud *u = alloc_shared(L, VALUE_MAGIC, tc, 1);
  store_bits(tc, u->data, bits);
  set_lock(L, 3);
  return 1;
}

/* array_new(typecode, size_or_table, lock|false) */
static int l_array_new(lua_State *L) {
  const tcode *tc = check_tcode(L, 1);
  lua_Integer n;
  int from_table = lua_istable(L, 2);
  if (from_table) {
    n = luaL_len(L, 2);
    for (lua_Integer i = 1; i <= n; i++) {   /* check them all before taking memory */
      lua_geti(L, 2, i);
      check_elem(L, -1, tc, "element");
      lua_pop(L, 1);
    }
  } else {
    int ok;
    n = lua_tointegerx(L, 2, &ok);
    if (lua_type(L, 2) != LUA_TNUMBER || !ok)
      luamp_raise(L, "Value", "Array: size must be an integer or a table, got %s", luaL_typename(L, 2));
    if (n < 0) luamp_raise(L, "Value", "Array: size must not be negative");
  }
  shared_ud *u = alloc_shared(L, ARRAY_MAGIC, tc, (uint64_t)n);
  for (lua_Integer i = 1; from_table && i <= n; i++) {
    lua_geti(L, 2, i);
    store_bits(tc, u->data + (i - 1) * tc->size, check_elem(L, -1, tc, "element"));
    lua_pop(L, 1);
  }
  set_lock(L, 3);
  return 1;
}

/* shared_attach("Value"|"Array", payload, lock|false): the receiving side of a handle */
static int l_shared_attach(lua_State *L) {
  const char *kind = luaL_checkstring(L, 1);
  int is_value = strcmp(kind, "Value") == 0;
  if (!is_value && strcmp(kind, "Array") != 0) luamp_raise(L, "Value", "unknown shared type '%s'", kind);
  uint64_t magic = is_value ? VALUE_MAGIC : ARRAY_MAGIC;
  shared_ud *u = new_shared_ud(L, magic);
  shared_hdr *h = luamp_ref_attach(L, &u->ref, 2, is_value ? LUAMP_OBJ_VALUE : LUAMP_OBJ_ARRAY, sizeof *h);
  const tcode *tc = code_by_char((char)h->code);
  uint64_t n = h->n;
  size_t cap = luamp_ref_capacity(&u->ref) - sizeof *h;
  if (!tc || h->code > 127 || (is_value && n != 1) || n > cap / tc->size) {
    luamp_ref_release(&u->ref);
    luamp_raise(L, "Value", "cannot attach shared object: its header is damaged");
  }
  set_shape(u, tc, n, (char *)(h + 1));
  /* the object this process already has, if it is open: its reference stays, ours goes */
  luamp_ref_push_key(L, &u->ref);
  const char *key = lua_tostring(L, -1);
  if (luamp_handle_find(L, key)) {
    shared_ud *old = lua_touserdata(L, -1);
    if (old && lua_rawlen(L, -1) == sizeof *old && old->magic == magic && old->data) {
      u->data = NULL;
      luamp_ref_release(&u->ref);
      return 1;
    }
    lua_pop(L, 1);
  }
  luamp_handle_remember(L, -2, key);
  lua_pop(L, 1);
  set_lock(L, 3);
  return 1;
}

/* The lock is a Lock's or RLock's table, or false. */
static void push_lock(lua_State *L, int idx, const char *what) {
  if (lua_getiuservalue(L, idx, 1) != LUA_TTABLE)
    luamp_raise(L, "Value", "this %s was made without a lock", what);
}

static int l_shared_close(lua_State *L) {
  shared_ud *u = lua_touserdata(L, 1);
  if (u && lua_rawlen(L, 1) == sizeof *u && (u->magic == VALUE_MAGIC || u->magic == ARRAY_MAGIC)) {
    u->data = NULL;
    luamp_ref_release(&u->ref);
  }
  return 0;
}

/* __luamp_handle: -> "luamp.Value"|"luamp.Array", {core = payload, lock = lock|false} */
static int l_shared_handle(lua_State *L) {
  shared_ud *u = lua_touserdata(L, 1);
  if (!u || lua_rawlen(L, 1) != sizeof *u || (u->magic != VALUE_MAGIC && u->magic != ARRAY_MAGIC))
    luamp_raise(L, "Value", "expected a Value or an Array");
  if (!u->data) luamp_raise(L, "Value", "cannot send a closed %s", u->magic == VALUE_MAGIC ? "Value" : "Array");
  luamp_ref_push_key(L, &u->ref);
  luamp_handle_remember(L, 1, lua_tostring(L, -1));
  lua_pop(L, 1);
  lua_pushstring(L, u->magic == VALUE_MAGIC ? "luamp.Value" : "luamp.Array");
  lua_createtable(L, 0, 2);
  luamp_ref_push_payload(L, &u->ref);
  lua_setfield(L, -2, "core");
  lua_getiuservalue(L, 1, 1);
  lua_setfield(L, -2, "lock");
  return 2;
}

/* ---- Value binding ---- */

static inline shared_ud *open_value(lua_State *L);

static int l_value_get_lock(lua_State *L) {
  open_value(L);
  push_lock(L, 1, "Value");
  return 1;
}

/* v:add(n) for an integer n and a signed 4- or 8-byte counter, without the general codec
 * (no __int128, no typecode table): 1 done, the new value pushed; 0 for any other case,
 * and for a result out of range, which the general path then reports. */
static int add_int_fast(lua_State *L, shared_ud *u) {
  if (!u->int_size || !lua_isinteger(L, 2)) return 0;
  lua_Integer d = lua_tointeger(L, 2), r;
  if (u->int_size == 4) {
    int32_t *p = (int32_t *)u->data;
    int32_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
    do {
      if (__builtin_add_overflow((lua_Integer)cur, d, &r) || r != (int32_t)r) return 0;
    } while (!__atomic_compare_exchange_n(p, &cur, (int32_t)r, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  } else {
    int64_t *p = (int64_t *)u->data;
    int64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
    do {
      if (__builtin_add_overflow((lua_Integer)cur, d, &r)) return 0;
    } while (!__atomic_compare_exchange_n(p, &cur, (int64_t)r, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  }
  lua_pushinteger(L, r);
  return 1;
}

/* v:add(n) for any typecode and number, through the general codec (its own function, so
 * that the fast path's frame stays small) */
static __attribute__((noinline)) int value_add_general(lua_State *L, shared_ud *u) {
  const tcode *tc = u->tc;
  num d = check_num(L, 2, "increment");
  uint64_t cur = load_bits(tc, u->data), nb;
  num r;
  for (;;) {
    r = decode(tc, cur);
    if (r.is_float) {
      r.f += d.is_float ? d.f : (double)d.i;
    } else if (d.is_float) {
      r.is_float = 1;
      r.f = (double)r.i + d.f;
    } else {
      r.i += d.i;
    }
    const char *why = encode(tc, r, &nb);
    if (why) luamp_raise(L, "Value", "Value:add: result %s for typecode '%c'", why, tc->code);
    if (cas_bits(tc, u->data, &cur, nb)) break;
  }
  push_num(L, decode(tc, nb));
  return 1;
}

/* v:add(n) -> the new value, atomically (no lock needed) */
static int l_value_add(lua_State *L) {
  shared_ud *u = to_shared(L, 1, VALUE_MAGIC, 1);
  if (add_int_fast(L, u)) return 1;
  return value_add_general(L, u);
}

/* v:cas(old, new) -> true if the value was old (compared as stored) and is now new */
static int l_value_cas(lua_State *L) {
  shared_ud *u = to_shared(L, 1, VALUE_MAGIC, 1);
  uint64_t old = check_elem(L, 2, u->tc, "expected value");
  uint64_t nw = check_elem(L, 3, u->tc, "new value");
  lua_pushboolean(L, cas_bits(u->tc, u->data, &old, nw));
  return 1;
}

/* The hot paths of `v.value` and `v.value = x`: the self check is the magic number (no
 * registry lookup), and the key is recognised by identity: short strings are interned,
 * so while the metatable's closures keep "value" alive, a key is "value" exactly when it
 * is that very string, whose address each userdata keeps (no strcmp, no upvalue). */
static inline shared_ud *open_value(lua_State *L) {
  shared_ud *u = lua_touserdata(L, 1);
  if (u && lua_rawlen(L, 1) == sizeof *u && u->magic == VALUE_MAGIC && u->data) return u;
  return to_shared(L, 1, VALUE_MAGIC, 1);   /* raises the right error */
}

/* The element of a Value of a signed integer typecode of 4 or 8 bytes (the usual
 * counters) read and pushed without the general decoder; 0 for any other typecode. */
static inline int push_int_fast(lua_State *L, const shared_ud *u) {
  if (u->int_size == 4) lua_pushinteger(L, __atomic_load_n((const int32_t *)u->data, __ATOMIC_RELAXED));
  else if (u->int_size == 8) lua_pushinteger(L, __atomic_load_n((const int64_t *)u->data, __ATOMIC_RELAXED));
  else return 0;
  return 1;
}

static int l_value_index(lua_State *L) {
  shared_ud *u = to_shared(L, 1, VALUE_MAGIC, 0);
  const void *key = lua_topointer(L, 2);
  if (key == u->value_key) {
    if (!u->data) luamp_raise(L, "Value", "Value is closed");
    if (!push_int_fast(L, u)) push_elem(L, u->tc, u->data);
    return 1;
  }
  /* and v:add(n), the atomic counter's, without the methods table */
  if (key == u->add_key) {
    lua_pushcfunction(L, l_value_add);
    return 1;
  }
  /* the other lookup in a loop (v:get_lock() around an update), without the table */
  if (key == u->get_lock_key) {
    lua_pushcfunction(L, l_value_get_lock);
    return 1;
  }
  lua_pushvalue(L, 2);
  if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) return 1;
  if (lua_type(L, 2) == LUA_TSTRING && strcmp(lua_tostring(L, 2), "typecode") == 0)
    lua_pushlstring(L, &u->tc->code, 1);
  else
    lua_pushnil(L);
  return 1;
}

/* An integer that fits an integer typecode, stored without the general encoder. */
static int store_int_fast(const tcode *tc, char *p, lua_Integer i) {
  unsigned bits = 8u * tc->size;
  if (tc->kind == SIGNED) {
    if (bits < 64 && (i < -((lua_Integer)1 << (bits - 1)) || i >= ((lua_Integer)1 << (bits - 1)))) return 0;
  } else if (tc->kind == UNSIGNED) {
    if (i < 0 || (bits < 64 && (uint64_t)i >> bits)) return 0;
  } else {
    return 0;
  }
  store_bits(tc, p, (uint64_t)i);
  return 1;
}

static int l_value_newindex(lua_State *L) {
  shared_ud *u = open_value(L);
  if (lua_topointer(L, 2) != u->value_key)
    luamp_raise(L, "Value", "a Value has no settable field '%s'", luaL_tolstring(L, 2, NULL));
  if (lua_isinteger(L, 3)) {
    lua_Integer i = lua_tointeger(L, 3);
    if (u->int_size == 4 && i == (int32_t)i) {
      __atomic_store_n((int32_t *)u->data, (int32_t)i, __ATOMIC_RELAXED);
      return 0;
    }
    if (u->int_size == 8) {
      __atomic_store_n((int64_t *)u->data, (int64_t)i, __ATOMIC_RELAXED);
      return 0;
    }
    if (store_int_fast(u->tc, u->data, i)) return 0;
  }
  store_bits(u->tc, u->data, check_elem(L, 3, u->tc, "value"));
  return 0;
}

static int l_value_tostring(lua_State *L) {
  shared_ud *u = to_shared(L, 1, VALUE_MAGIC, 0);
  if (!u->data) return lua_pushliteral(L, "<Value closed>"), 1;
  push_elem(L, u->tc, u->data);
  lua_pushfstring(L, "<Value %c %s>", u->tc->code, luaL_tolstring(L, -1, NULL));
  return 1;
}

/* ---- Array binding ---- */

/* A 1-based index in range, from an integer or an integral float; raises Value otherwise. */
static uint64_t check_index(lua_State *L, shared_ud *u, int idx) {
  int ok;
  lua_Integer i = lua_tointegerx(L, idx, &ok);
  if (lua_type(L, idx) != LUA_TNUMBER || !ok)
    luamp_raise(L, "Value", "Array index must be an integer, got %s", luaL_tolstring(L, idx, NULL));
  if (i < 1 || (uint64_t)i > u->n)
    luamp_raise(L, "Value", "Array index %lld out of range 1..%llu", (long long)i, (unsigned long long)u->n);
  return (uint64_t)(i - 1);
}

static int l_array_index(lua_State *L) {
  shared_ud *u = to_shared(L, 1, ARRAY_MAGIC, 0);
  if (lua_type(L, 2) == LUA_TSTRING) {
    const char *k = lua_tostring(L, 2);
    if (strcmp(k, "typecode") == 0) {
      lua_pushlstring(L, &u->tc->code, 1);
      return 1;
    }
    lua_pushvalue(L, 2);
    lua_rawget(L, lua_upvalueindex(1));
    return 1;
  }
  if (!u->data) luamp_raise(L, "Value", "Array is closed");
  /* a[#a + 1] is nil, the border ipairs stops at; other reads out of range raise */
  if (lua_isinteger(L, 2) && (uint64_t)lua_tointeger(L, 2) == u->n + 1) return 0;
  uint64_t i = check_index(L, u, 2);
  push_elem(L, u->tc, u->data + i * u->tc->size);
  return 1;
}

static int l_array_newindex(lua_State *L) {
  shared_ud *u = to_shared(L, 1, ARRAY_MAGIC, 1);
  uint64_t i = check_index(L, u, 2);
  store_bits(u->tc, u->data + i * u->tc->size, check_elem(L, 3, u->tc, "element"));
  return 0;
}

static int l_array_len(lua_State *L) {
  shared_ud *u = to_shared(L, 1, ARRAY_MAGIC, 1);
  lua_pushinteger(L, (lua_Integer)u->n);
  return 1;
}

/* a:totable([i=1], [j=#a]) -> plain table of a[i..j] */
static int l_array_totable(lua_State *L) {
  shared_ud *u = to_shared(L, 1, ARRAY_MAGIC, 1);
  lua_Integer i = luaL_optinteger(L, 2, 1), j = luaL_optinteger(L, 3, (lua_Integer)u->n);
  if (i < 1) i = 1;
  if (j > (lua_Integer)u->n) j = (lua_Integer)u->n;
  lua_createtable(L, i <= j ? (int)(j - i + 1) : 0, 0);
  for (lua_Integer k = i; k <= j; k++) {
    push_elem(L, u->tc, u->data + (k - 1) * u->tc->size);
    lua_rawseti(L, -2, k - i + 1);
  }
  return 1;
}

static int array_next(lua_State *L) {
  shared_ud *u = to_shared(L, 1, ARRAY_MAGIC, 1);
  lua_Integer i = luaL_optinteger(L, 2, 0) + 1;
  if (i < 1 || (uint64_t)i > u->n) return 0;
  lua_pushinteger(L, i);
  push_elem(L, u->tc, u->data + (i - 1) * u->tc->size);
  return 2;
}

/* pairs(a) walks 1..#a (ipairs cannot: reading past the end raises, as in Python) */
static int l_array_pairs(lua_State *L) {
  to_shared(L, 1, ARRAY_MAGIC, 1);
  lua_pushcfunction(L, array_next);
  lua_pushvalue(L, 1);
  lua_pushinteger(L, 0);
  return 3;
}

static int l_array_get_lock(lua_State *L) {
  to_shared(L, 1, ARRAY_MAGIC, 1);
  push_lock(L, 1, "Array");
  return 1;
}

static int l_array_tostring(lua_State *L) {
  shared_ud *u = to_shared(L, 1, ARRAY_MAGIC, 0);
  if (!u->data) lua_pushliteral(L, "<Array closed>");
  else lua_pushfstring(L, "<Array %c size=%I>", u->tc->code, (lua_Integer)u->n);
  return 1;
}

/* ---- SharedMemory --------------------------------------------------------------------- */

#define SHM_MAGIC 0x6d6873706d756c00ULL
#define SHM_MT "luamp.SharedMemory"

typedef struct shm_ud {
  uint64_t magic;
  char *base;              /* NULL once closed */
  size_t size;
  char name[256];          /* with the leading '/' */
} shm_ud;

static shm_ud *to_shm(lua_State *L, int open) {
  shm_ud *u = lua_touserdata(L, 1);
  if (!u || lua_rawlen(L, 1) != sizeof *u || u->magic != SHM_MAGIC)
    luamp_raise(L, "Value", "expected a SharedMemory, got %s", luaL_typename(L, 1));
  if (open && !u->base) luamp_raise(L, "Value", "SharedMemory is closed");
  return u;
}

static void shm_set_name(lua_State *L, shm_ud *u, const char *name) {
  if (name[0] == '/') name++;
  size_t len = strlen(name);
  if (len == 0 || len > sizeof u->name - 2 || strchr(name, '/'))
    luamp_raise(L, "Value", "SharedMemory: bad name '%s' (1 to %d characters, no '/')", name,
                (int)sizeof u->name - 2);
  u->name[0] = '/';
  memcpy(u->name + 1, name, len + 1);
}

static int shm_open_new(shm_ud *u, int named) {
  for (int tries = 0; tries < 100; tries++) {
    if (!named) {
      uint8_t r[8];
      ssize_t got;
      do got = getrandom(r, sizeof r, 0); while (got < 0 && errno == EINTR);
      if (got != (ssize_t)sizeof r) memset(r, tries, sizeof r);
      snprintf(u->name, sizeof u->name, "/luamp_%d_%02x%02x%02x%02x%02x%02x", (int)getpid(),
               r[0], r[1], r[2], r[3], r[4], r[5]);
    }
    int fd;
    do fd = shm_open(u->name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600); while (fd < 0 && errno == EINTR);
    if (fd >= 0 || named || errno != EEXIST) return fd;
  }
  return -1;
}

/* shm_new(name|nil, create, size) */
static int l_shm_new(lua_State *L) {
  const char *name = luaL_optstring(L, 1, NULL);
  int create = lua_toboolean(L, 2);
  lua_Integer size = luaL_optinteger(L, 3, 0);
  shm_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  u->magic = SHM_MAGIC;
  luaL_setmetatable(L, SHM_MT);
  if (name) shm_set_name(L, u, name);
  else if (!create) luamp_raise(L, "Value", "SharedMemory: a name is needed to attach");
  if (create && size <= 0) luamp_raise(L, "Value", "SharedMemory: size must be a positive number");
  int fd, err;
  if (create) {
    fd = shm_open_new(u, name != NULL);
    err = errno;
    if (fd < 0 && err == EEXIST) luamp_raise(L, "Value", "SharedMemory '%s' already exists", u->name + 1);
    if (fd < 0) luamp_raise_errno(L, "Value", "shm_open", err);
    int rc;
    do rc = ftruncate(fd, (off_t)size); while (rc < 0 && errno == EINTR);
    if (rc < 0) {
      err = errno;
      shm_unlink(u->name);
      luamp_close_fd(fd);
      luamp_raise_errno(L, "Value", "SharedMemory: ftruncate", err);
    }
  } else {
    do fd = shm_open(u->name, O_RDWR | O_CLOEXEC, 0600); while (fd < 0 && errno == EINTR);
    err = errno;
    if (fd < 0 && err == ENOENT) luamp_raise(L, "NotFound", "no SharedMemory named '%s'", u->name + 1);
    if (fd < 0) luamp_raise_errno(L, "Value", "shm_open", err);
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_size <= 0) {
      luamp_close_fd(fd);
      luamp_raise(L, "Value", "SharedMemory '%s' is empty", u->name + 1);
    }
    size = st.st_size;
  }
  void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  err = errno;
  luamp_close_fd(fd);   /* the mapping keeps the memory */
  if (p == MAP_FAILED) {
    if (create) shm_unlink(u->name);
    luamp_raise_errno(L, "Value", "SharedMemory: mmap", err);
  }
  u->base = p;
  u->size = (size_t)size;
  return 1;
}

/* A string.sub-style position (negative counts from the end) as a 0-based offset. */
static size_t shm_pos(lua_State *L, shm_ud *u, int idx) {
  lua_Integer pos = luaL_optinteger(L, idx, 1);
  if (pos < 0) pos += (lua_Integer)u->size + 1;
  if (pos < 1 || (uint64_t)pos > (uint64_t)u->size + 1)
    luamp_raise(L, "Value", "SharedMemory: position %lld out of range 1..%zu", (long long)luaL_optinteger(L, idx, 1), u->size);
  return (size_t)(pos - 1);
}

/* shm:read([pos=1], [n=rest]) -> string */
static int l_shm_read(lua_State *L) {
  shm_ud *u = to_shm(L, 1);
  size_t at = shm_pos(L, u, 2);
  lua_Integer n = luaL_optinteger(L, 3, (lua_Integer)(u->size - at));
  if (n < 0 || (uint64_t)n > u->size - at)
    luamp_raise(L, "Value", "SharedMemory: cannot read %lld bytes at %zu (size %zu)", (long long)n, at + 1, u->size);
  lua_pushlstring(L, u->base + at, (size_t)n);
  return 1;
}

/* shm:write(pos, s) */
static int l_shm_write(lua_State *L) {
  shm_ud *u = to_shm(L, 1);
  size_t at = shm_pos(L, u, 2);
  size_t len;
  const char *s = luaL_checklstring(L, 3, &len);
  if (len > u->size - at)
    luamp_raise(L, "Value", "SharedMemory: cannot write %zu bytes at %zu (size %zu)", len, at + 1, u->size);
  memcpy(u->base + at, s, len);
  return 0;
}

static void shm_release(shm_ud *u) {
  if (!u->base) return;
  munmap(u->base, u->size);
  u->base = NULL;
}

static int l_shm_close(lua_State *L) {
  shm_ud *u = lua_touserdata(L, 1);
  if (u && lua_rawlen(L, 1) == sizeof *u && u->magic == SHM_MAGIC) shm_release(u);
  return 0;
}

/* shm:unlink(): removes the name (mappings stay valid); NotFound if already gone */
static int l_shm_unlink(lua_State *L) {
  shm_ud *u = to_shm(L, 0);
  if (shm_unlink(u->name) < 0) {
    int err = errno;
    if (err == ENOENT) luamp_raise(L, "NotFound", "no SharedMemory named '%s'", u->name + 1);
    luamp_raise_errno(L, "Value", "shm_unlink", err);
  }
  return 0;
}

static int l_shm_index(lua_State *L) {
  shm_ud *u = to_shm(L, 0);
  const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : "";
  if (strcmp(k, "name") == 0) {
    lua_pushstring(L, u->name + 1);
    return 1;
  }
  if (strcmp(k, "size") == 0) {
    lua_pushinteger(L, (lua_Integer)u->size);
    return 1;
  }
  if (strcmp(k, "closed") == 0) {
    lua_pushboolean(L, !u->base);
    return 1;
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int l_shm_tostring(lua_State *L) {
  shm_ud *u = to_shm(L, 0);
  if (!u->base) lua_pushfstring(L, "<SharedMemory name=%s closed>", u->name + 1);
  else lua_pushfstring(L, "<SharedMemory name=%s size=%I>", u->name + 1, (lua_Integer)u->size);
  return 1;
}

static int l_shm_handle(lua_State *L) {
  shm_ud *u = to_shm(L, 0);
  lua_pushliteral(L, "luamp.SharedMemory");
  lua_createtable(L, 0, 1);
  lua_pushstring(L, u->name + 1);
  lua_setfield(L, -2, "name");
  return 2;
}

/* ---- registration --------------------------------------------------------------------- */

/* A metatable whose __index is a C closure over the methods table. */
static void define_type(lua_State *L, const char *name, const luaL_Reg *methods,
                        const luaL_Reg *meta, lua_CFunction index) {
  luaL_newmetatable(L, name);
  luaL_setfuncs(L, meta, 0);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_pushliteral(L, "value");   /* unused: keeps the string alive (see l_value_index) */
  lua_pushcclosure(L, index, 2);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}

int luamp_open_shared(lua_State *L) {
  static const luaL_Reg value_methods[] = {
    {"get_lock", l_value_get_lock}, {"add", l_value_add}, {"cas", l_value_cas},
    {"close", l_shared_close},
    {NULL, NULL}
  };
  static const luaL_Reg value_meta[] = {
    {"__newindex", l_value_newindex}, {"__tostring", l_value_tostring},
    {"__gc", l_shared_close}, {"__close", l_shared_close}, {"__luamp_handle", l_shared_handle},
    {NULL, NULL}
  };
  static const luaL_Reg array_methods[] = {
    {"totable", l_array_totable}, {"get_lock", l_array_get_lock}, {"close", l_shared_close},
    {NULL, NULL}
  };
  static const luaL_Reg array_meta[] = {
    {"__newindex", l_array_newindex}, {"__len", l_array_len}, {"__pairs", l_array_pairs},
    {"__tostring", l_array_tostring}, {"__gc", l_shared_close}, {"__close", l_shared_close},
    {"__luamp_handle", l_shared_handle},
    {NULL, NULL}
  };
  static const luaL_Reg shm_methods[] = {
    {"read", l_shm_read}, {"write", l_shm_write}, {"close", l_shm_close},
    {"unlink", l_shm_unlink},
    {NULL, NULL}
  };
  static const luaL_Reg shm_meta[] = {
    {"__tostring", l_shm_tostring}, {"__gc", l_shm_close}, {"__close", l_shm_close},
    {"__luamp_handle", l_shm_handle},
    {NULL, NULL}
  };
  static const luaL_Reg fns[] = {
    {"value_new", l_value_new},
    {"array_new", l_array_new},
    {"shared_attach", l_shared_attach},
    {"shm_new", l_shm_new},
    {NULL, NULL}
  };
  define_type(L, "luamp.Value", value_methods, value_meta, l_value_index);

  define_type(L, "luamp.Array", array_methods, array_meta, l_array_index);
  define_type(L, SHM_MT, shm_methods, shm_meta, l_shm_index);
  luaL_setfuncs(L, fns, 0);
  return 0;
}
