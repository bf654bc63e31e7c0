/*
 * codec.c — the value codec: how a Lua value becomes bytes for another process and back.
 *
 * One recursive pass in C over the value, appending to a luamp_buf; decoding is the
 * mirror image, pushing Lua objects as it reads. The C API (luamp_encodex/decodex) runs
 * the pass inside a lua_pcall, so any Lua error (a bad value, a failing hook, out of
 * memory) unwinds only to it, which frees its C memory and hands back an error object:
 * nothing is ever raised past a caller's buffer. luamp.dumps/loads skip the pcall: the
 * decoder holds no C memory, and dumps keeps its buffer and memo in a userdata that is
 * closed on error.
 *
 * Format (all integers little-endian; "uv" is an unsigned LEB128 varint, which the
 * decoder accepts padded with redundant continuation bytes):
 *   byte 0          CODEC_VERSION
 *   value           one tag byte, then:
 *     0x80..0xff    integer 0..127 in the tag itself
 *     0x40..0x7f    string of length 0..63 in the tag, bytes follow
 *     T_NIL/T_FALSE/T_TRUE
 *     T_INT8/16/32/64, T_FLOAT (IEEE double bits)
 *     T_STR         uv length, bytes
 *     T_TABLE[_MT]  uv n_array, uv n_hash, n_array values (t[1..n]), n_hash key/value
 *                   pairs, then for _MT the metatable value
 *     T_REF         uv index of an object met earlier (see "references")
 *     T_FUNC        uv length (written padded to 5 bytes), bytecode with debug info
 *                   (lua_dump), byte nups, then per upvalue: UP_NEW value, or
 *                   UP_SHARED uv function-ref, byte n (lua_upvaluejoin to that one's n-th)
 *     T_GLOBALS     the receiver's global table
 *     T_NAMED       uv length, module name, uv (field length + 1, 0 = the module itself),
 *                   field name: looked up with require on the receiving side
 *     T_HANDLE      uv length, type name, payload value: rebuilt by the function
 *                   registered with _core.register_handle
 * References: tables and Lua functions (when their header is read), handles (after their
 * payload) and strings of MEMO_STRLEN bytes or more are numbered from 0 in stream order,
 * identically on both sides, so shared tables, cycles and repeated big strings survive.
 * Every object is complete or being filled when it gets its number, so a reference never
 * points at a placeholder.
 *
 * Named values: tables and functions reachable as package.loaded[m] or
 * package.loaded[m][field] cross by name. The reverse map is built on first need and
 * cached in the registry; a watch on package.loaded (see watch_loaded) drops it when a
 * module is added. Of _G's fields only C functions are named: a user's global data and
 * functions must cross by value.
 *
 * Hostile input: every length is checked against the bytes left before anything is
 * allocated, table preallocation is bounded by the input size overall, nesting by
 * MAX_DEPTH. Trust is the caller's to give (see internal.h): luamp's own processes
 * decode each other trusted; luamp.loads is untrusted unless asked. Untrusted input
 * (LUAMP_DECODE_UNTRUSTED) yields plain data only: no bytecode reaches lua_load (Lua does
 * not verify bytecode, and bad bytecode crashes it), no require runs, and no tag that
 * hands out a live object of the receiver is accepted (the global table, a module or its
 * field by name, which includes luamp's error metatable, a handle, whose rebuild would
 * open the descriptors a payload names).
 */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define CODEC_VERSION 1
#define MAX_DEPTH 200          /* nested tables/functions/handles, both directions */
#define MEMO_STRLEN 32         /* strings this long are sent once and referenced after */

enum {
  T_NIL = 0x00, T_FALSE, T_TRUE, T_INT8, T_INT16, T_INT32, T_INT64, T_FLOAT,
  T_STR, T_TABLE, T_TABLE_MT, T_REF, T_FUNC, T_GLOBALS, T_NAMED, T_HANDLE,
  T_SHORTSTR = 0x40, T_FIXINT = 0x80
};
enum { UP_NEW = 0, UP_SHARED = 1 };

/* ---- byte buffer ------------------------------------------------------------------- */

void luamp_buf_init(luamp_buf *b) { b->data = NULL; b->len = b->cap = 0; }

int luamp_buf_reserve(luamp_buf *b, size_t extra) {
  if (b->cap - b->len >= extra) return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap - b->len < extra) {
    if (cap > SIZE_MAX / 2) return -1;
    cap *= 2;
  }
  char *p;
  if (cap < LUAMP_POPULATE_MIN) {
    p = realloc(b->data, cap);
    if (!p) return -1;
  } else {
    /* a big buffer (a Pool chunk's ~1 MB of results) is mapped in one go before it is
     * written, not faulted in a page at a time (luamp_populate); realloc would copy into
     * the new block first */
    p = malloc(cap);
    if (!p) return -1;
    luamp_populate(p, cap, 1);
    if (b->len) memcpy(p, b->data, b->len);
    free(b->data);
  }
  b->data = p;
  b->cap = cap;
  return 0;
}

void luamp_buf_free(luamp_buf *b) { free(b->data); luamp_buf_init(b); }

/* ---- little-endian fixed-width and varint helpers --------------------------------- */

static inline void store_le(unsigned char *p, uint64_t v, int n) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  memcpy(p, &v, (size_t)n);
#else
  for (int i = 0; i < n; i++) p[i] = (unsigned char)(v >> (8 * i));
#endif
}

static inline uint64_t load_le(const unsigned char *p, int n) {
  uint64_t v = 0;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  memcpy(&v, p, (size_t)n);
#else
  for (int i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
#endif
  return v;
}

static inline int varint_put(unsigned char *p, uint64_t v) {
  int n = 0;
  while (v >= 0x80) { p[n++] = (unsigned char)(v | 0x80); v >>= 7; }
  p[n++] = (unsigned char)v;
  return n;
}

/* ---- pointer memo: object/upvalue identity -> reference number ---------------------- */

/* Entries from earlier calls (older gen) count as empty, so a memo kept between calls
 * is cleared in O(1). Values are 32-bit: no message holds 4 billion objects. */
typedef struct memo_entry { const void *key; uint32_t val, gen; } memo_entry;
typedef struct memo {
  memo_entry *e;
  size_t cap, count;      /* cap is 0 or a power of two; count: entries of this gen */
  uint32_t gen;
} memo;

/* Keeps neighbouring addresses in neighbouring slots: objects built one after another
 * (the common case) then probe memory in order instead of at random, which is most of
 * the memo's cost; the high bits folded in break up regular strides. */
static inline size_t memo_hash(const void *p, size_t mask) {
  uint64_t h = (uint64_t)(uintptr_t)p;
  return (size_t)((h >> 4) ^ (h >> 23) ^ (h >> 41)) & mask;
}

static int memo_grow(memo *m) {
  size_t ncap = m->cap ? m->cap * 2 : 64;
  memo_entry *ne = calloc(ncap, sizeof *ne);
  if (!ne) return -1;
  for (size_t i = 0; i < m->cap; i++) {
    if (m->e[i].gen != m->gen) continue;
    size_t j = memo_hash(m->e[i].key, ncap - 1);
    while (ne[j].gen == m->gen) j = (j + 1) & (ncap - 1);
    ne[j] = m->e[i];
  }
  free(m->e);
  m->e = ne;
  m->cap = ncap;
  return 0;
}

/* The entry for key: either holding it (gen current), or free where it belongs; the
 * caller fills a free one with memo_fill before any other memo call. NULL when out of
 * memory. */
static inline memo_entry *memo_slot(memo *m, const void *key) {
  if ((m->count + 1) * 2 > m->cap && memo_grow(m)) return NULL;
  size_t mask = m->cap - 1;
  for (size_t i = memo_hash(key, mask);; i = (i + 1) & mask)
    if (m->e[i].gen != m->gen || m->e[i].key == key) return &m->e[i];
}

static inline int memo_hit(const memo *m, const memo_entry *s) { return s->gen == m->gen; }

static inline void memo_fill(memo *m, memo_entry *s, const void *key, uint32_t val) {
  s->key = key;
  s->val = val;
  s->gen = m->gen;
  m->count++;
}

/* Forgets every entry. A new memo starts at gen 1 (calloc'd entries are gen 0). */
static void memo_clear(memo *m) {
  m->count = 0;
  if (++m->gen == 0) {
    if (m->e) memset(m->e, 0, m->cap * sizeof *m->e);
    m->gen = 1;
  }
}

static void memo_free(memo *m) {
  free(m->e);
  memset(m, 0, sizeof *m);
  m->gen = 1;
}

/* ---- the reverse map of named values (package.loaded) ------------------------------
 * A userdata holding an open-addressed table {object pointer -> record} followed by the
 * records' bytes (each a complete T_NAMED value). Its user value anchors the objects so
 * their addresses cannot be reused while the map lives. */

typedef struct name_slot { const void *key; uint32_t off, len; } name_slot;
typedef struct names {
  uint64_t fingerprint;
  size_t mask;             /* slots: mask + 1 entries, then the record bytes */
  name_slot slots[];
} names;

static char names_regkey;  /* registry key (its address) of the cached map */

static inline const unsigned char *names_find(const names *nm, const void *p, size_t *len) {
  for (size_t i = memo_hash(p, nm->mask);; i = (i + 1) & nm->mask) {
    const name_slot *s = &nm->slots[i];
    if (s->key == p) {
      *len = s->len;
      return (const unsigned char *)&nm->slots[nm->mask + 1] + s->off;
    }
    if (!s->key) return NULL;
  }
}

static uint64_t loaded_fingerprint(lua_State *L, int loaded) {
  uint64_t fp = 0, n = 0;
  lua_pushnil(L);
  while (lua_next(L, loaded)) {
    uint64_t k = (uintptr_t)lua_topointer(L, -2), v = (uintptr_t)lua_topointer(L, -1);
    uint64_t h = (k * 0x9e3779b97f4a7c15ull) ^ (v * 0xc2b2ae3d27d4eb4full);
    fp += h ^ (h >> 31);
    n++;
    lua_pop(L, 1);
  }
  return fp ^ (n * 0x165667b19e3779f9ull);
}

static int nameable(lua_State *L, int idx) {
  int t = lua_type(L, idx);
  return t == LUA_TTABLE || t == LUA_TFUNCTION;
}

/* Is (mod, field) a better name than the one recorded for the object at the top? Shorter
 * module names win, then byte order: the choice must not depend on traversal order. */
static int better_name(lua_State *L, int best, const char *mod, size_t modlen,
                       const char *field, size_t fieldlen) {
  lua_pushvalue(L, -1);
  if (lua_rawget(L, best) == LUA_TNIL) { lua_pop(L, 1); return 1; }
  lua_rawgeti(L, -1, 1);
  lua_rawgeti(L, -2, 2);
  size_t omodlen, ofieldlen;
  const char *omod = lua_tolstring(L, -2, &omodlen);
  const char *ofield = lua_tolstring(L, -1, &ofieldlen);
  int better;
  if (!ofield) better = 0;                         /* a module itself beats any field */
  else if (!field) better = 1;
  else if (modlen != omodlen) better = modlen < omodlen;
  else {
    int c = memcmp(mod, omod, modlen);
    if (c) better = c < 0;
    else better = fieldlen < ofieldlen ||
                  (fieldlen == ofieldlen && memcmp(field, ofield, fieldlen) < 0);
  }
  lua_pop(L, 3);
  return better;
}

/* best[obj] = {mod, field or nil}, obj at the top (left there). */
static void offer_name(lua_State *L, int best, int mod, int field) {
  mod = lua_absindex(L, mod);
  if (field) field = lua_absindex(L, field);
  size_t modlen, fieldlen = 0;
  const char *m = lua_tolstring(L, mod, &modlen);
  const char *f = field ? lua_tolstring(L, field, &fieldlen) : NULL;
  if (!better_name(L, best, m, modlen, f, fieldlen)) return;
  lua_pushvalue(L, -1);
  lua_createtable(L, 2, 0);
  lua_pushvalue(L, mod);
  lua_rawseti(L, -2, 1);
  if (field) {
    lua_pushvalue(L, field);
    lua_rawseti(L, -2, 2);
  }
  lua_rawset(L, best);
}

static size_t name_record(unsigned char *out, const char *mod, size_t modlen,
                          const char *field, size_t fieldlen, int has_field) {
  size_t n = 0;
  out[n++] = T_NAMED;
  n += varint_put(out + n, modlen);
  memcpy(out + n, mod, modlen);
  n += modlen;
  n += varint_put(out + n, has_field ? fieldlen + 1 : 0);
  if (has_field) {
    memcpy(out + n, field, fieldlen);
    n += fieldlen;
  }
  return n;
}

/* Builds the map from package.loaded (at index loaded) and pushes its userdata. */
static names *build_names(lua_State *L, int loaded, uint64_t fingerprint) {
  luaL_checkstack(L, 12, NULL);
  lua_newtable(L);
  int best = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, loaded)) {                     /* the modules themselves */
    if (lua_type(L, -2) == LUA_TSTRING && nameable(L, -1)) offer_name(L, best, -2, 0);
    lua_pop(L, 1);
  }
  lua_pushnil(L);
  while (lua_next(L, loaded)) {                     /* then their fields */
    if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TTABLE) {
      int is_g = strcmp(lua_tostring(L, -2), "_G") == 0;
      int mod = lua_gettop(L) - 1, tab = mod + 1;
      lua_pushnil(L);
      while (lua_next(L, tab)) {
        if (lua_type(L, -2) == LUA_TSTRING && nameable(L, -1) &&
            (!is_g || lua_iscfunction(L, -1)))
          offer_name(L, best, mod, lua_gettop(L) - 1);
        lua_pop(L, 1);
      }
    }
    lua_pop(L, 1);
  }
  size_t count = 0, bytes = 0;
  lua_pushnil(L);
  while (lua_next(L, best)) {
    size_t modlen, fieldlen = 0;
    lua_rawgeti(L, -1, 1);
    lua_rawgeti(L, -2, 2);
    lua_tolstring(L, -2, &modlen);
    lua_tolstring(L, -1, &fieldlen);
    bytes += 1 + 10 + modlen + 10 + fieldlen;
    count++;
    lua_pop(L, 3);
  }
  size_t cap = 16;
  while (cap < count * 2) cap *= 2;
  names *nm = lua_newuserdatauv(L, sizeof *nm + cap * sizeof(name_slot) + bytes, 1);
  memset(nm->slots, 0, cap * sizeof(name_slot));
  nm->fingerprint = fingerprint;
  nm->mask = cap - 1;
  unsigned char *rec = (unsigned char *)&nm->slots[cap];
  size_t off = 0;
  lua_pushnil(L);
  while (lua_next(L, best)) {
    size_t modlen, fieldlen = 0;
    lua_rawgeti(L, -1, 1);
    lua_rawgeti(L, -2, 2);
    const char *mod = lua_tolstring(L, -2, &modlen);
    const char *field = lua_tolstring(L, -1, &fieldlen);
    const void *key = lua_topointer(L, -4);
    size_t i = memo_hash(key, nm->mask);
    while (nm->slots[i].key) i = (i + 1) & nm->mask;
    nm->slots[i].key = key;
    nm->slots[i].off = (uint32_t)off;
    nm->slots[i].len = (uint32_t)name_record(rec + off, mod, modlen, field, fieldlen,
                                             field != NULL);
    off += nm->slots[i].len;
    lua_pop(L, 3);
  }
  lua_pushvalue(L, best);                           /* anchors every named object */
  lua_setiuservalue(L, -2, 1);
  lua_remove(L, best);
  return nm;
}

/* ---- encoder --------------------------------------------------------------------- */

enum { STEP_KEY, STEP_KEYOF, STEP_META, STEP_UPVAL, STEP_PAYLOAD };
typedef struct step { int kind, idx; const char *name; } step;

typedef struct enc {
  lua_State *L;
  luamp_buf *b;
  const char *root;
  memo *m;
  uint64_t nrefs;
  int depth, nsteps;
  step path[MAX_DEPTH + 8];
  const void *globals;
  names *nm;               /* NULL until first needed this call */
  int names_fresh;         /* the map was (re)built during this call */
  int names_slot, anchor_slot, anchor_n;
  const void *slice;       /* this table is written as the list of its items i..j */
  lua_Integer slice_i, slice_j;
} enc;

/* Appends a rendering of the key at idx ("key" steps) to the path. */
static void path_key(luaL_Buffer *pb, lua_State *L, int idx, int as_key) {
  char tmp[64];
  const char *prefix = as_key ? "[key " : "[";
  switch (lua_type(L, idx)) {
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, idx, &len);
      int ident = len > 0 && len <= 60 && !(s[0] >= '0' && s[0] <= '9');
      for (size_t i = 0; ident && i < len; i++)
        ident = s[i] == '_' || (s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
                (s[i] >= '0' && s[i] <= '9');
      if (ident && !as_key) {
        luaL_addchar(pb, '.');
        luaL_addlstring(pb, s, len);
        return;
      }
      luaL_addstring(pb, prefix);
      luaL_addchar(pb, '"');
      for (size_t i = 0; i < len && i < 40; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') { luaL_addchar(pb, '\\'); luaL_addchar(pb, (char)c); }
        else if (c < 32 || c > 126) { snprintf(tmp, sizeof tmp, "\\%d", c); luaL_addstring(pb, tmp); }
        else luaL_addchar(pb, (char)c);
      }
      luaL_addstring(pb, len > 40 ? "\"...]" : "\"]");
      return;
    }
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) snprintf(tmp, sizeof tmp, "%lld", (long long)lua_tointeger(L, idx));
      else snprintf(tmp, sizeof tmp, "%.14g", (double)lua_tonumber(L, idx));
      break;
    case LUA_TBOOLEAN:
      snprintf(tmp, sizeof tmp, "%s", lua_toboolean(L, idx) ? "true" : "false");
      break;
    case LUA_TTHREAD:
      snprintf(tmp, sizeof tmp, "<coroutine>");
      break;
    default:
      snprintf(tmp, sizeof tmp, "<%s>", luaL_typename(L, idx));
  }
  luaL_addstring(pb, prefix);
  luaL_addstring(pb, tmp);
  luaL_addchar(pb, ']');
}

/* Pushes where the encoder is, in the user's terms, and a remark to follow the message:
 * `args[2].name`, `upvalue 'fh' of the task function`, `(upvalue 'cfg' of items[3]).x`.
 * The path stops at the first metatable: what lies beyond it is the inside of some
 * object (a Pool's bookkeeping), so the remark names that object's type instead. */
static void push_path(enc *e) {
  lua_State *L = e->L;
  char remark[160] = "";
  lua_pushstring(L, e->root);
  int bare = 1;                   /* the path so far needs no parentheses before a key */
  for (int i = 0; i < e->nsteps; i++) {
    if (i == 8 && e->nsteps > 16) {                 /* keep the message readable */
      lua_pushliteral(L, "...");
      lua_concat(L, 2);
      i = e->nsteps - 8;
    }
    const step *s = &e->path[i];
    if (s->kind == STEP_META) {
      if (s->idx && luaL_getmetafield(L, s->idx, "__name") != LUA_TNIL) {
        if (lua_type(L, -1) == LUA_TSTRING)
          snprintf(remark, sizeof remark, " (inside a %.100s)", lua_tostring(L, -1));
        lua_pop(L, 1);
      }
      if (!remark[0]) snprintf(remark, sizeof remark, " (inside its metatable)");
      break;
    }
    if (s->kind == STEP_UPVAL) {
      lua_pushfstring(L, "upvalue '%s' of %s", s->name && *s->name ? s->name : "?",
                      lua_tostring(L, -1));
      lua_remove(L, -2);
      bare = 0;
      continue;
    }
    if (!bare) {
      lua_pushfstring(L, "(%s)", lua_tostring(L, -1));
      lua_remove(L, -2);
      bare = 1;
    }
    luaL_Buffer pb;
    luaL_buffinit(L, &pb);
    if (s->kind == STEP_PAYLOAD) luaL_addstring(&pb, " (handle payload)");
    else path_key(&pb, L, s->idx, s->kind == STEP_KEYOF);
    luaL_pushresult(&pb);
    lua_concat(L, 2);
  }
  lua_pushstring(L, remark);
}

static int enc_fail(enc *e, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static int enc_fail(enc *e, const char *fmt, ...) {
  lua_State *L = e->L;
  char msg[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  luaL_checkstack(L, 8, NULL);
  push_path(e);
  luamp_raise(L, "Serialize", "%s: %s%s", lua_tostring(L, -2), msg, lua_tostring(L, -1));
}

static inline unsigned char *enc_room(enc *e, size_t n) {
  if (e->b->cap - e->b->len < n && luamp_buf_reserve(e->b, n))
    enc_fail(e, "out of memory");
  return (unsigned char *)e->b->data + e->b->len;
}

static inline void put_byte(enc *e, unsigned char c) {
  *enc_room(e, 1) = c;
  e->b->len++;
}

static inline void put_varint(enc *e, uint64_t v) {
  unsigned char *p = enc_room(e, 10);
  e->b->len += varint_put(p, v);
}

static inline void put_bytes(enc *e, const void *s, size_t n) {
  memcpy(enc_room(e, n), s, n);
  e->b->len += n;
}

static inline void put_int(enc *e, lua_Integer v) {
  unsigned char *p = enc_room(e, 9);
  if (v >= 0 && v < 128) { p[0] = (unsigned char)(T_FIXINT + v); e->b->len += 1; }
  else if (v >= INT8_MIN && v <= INT8_MAX) { p[0] = T_INT8; store_le(p + 1, (uint64_t)v, 1); e->b->len += 2; }
  else if (v >= INT16_MIN && v <= INT16_MAX) { p[0] = T_INT16; store_le(p + 1, (uint64_t)v, 2); e->b->len += 3; }
  else if (v >= INT32_MIN && v <= INT32_MAX) { p[0] = T_INT32; store_le(p + 1, (uint64_t)v, 4); e->b->len += 5; }
  else { p[0] = T_INT64; store_le(p + 1, (uint64_t)v, 8); e->b->len += 9; }
}

static inline void put_float(enc *e, lua_Number n) {
  double d = (double)n;
  uint64_t bits;
  memcpy(&bits, &d, 8);
  unsigned char *p = enc_room(e, 9);
  p[0] = T_FLOAT;
  store_le(p + 1, bits, 8);
  e->b->len += 9;
}

static void put_ref(enc *e, uint64_t ref) {
  unsigned char *p = enc_room(e, 11);
  p[0] = T_REF;
  e->b->len += 1 + varint_put(p + 1, ref);
}

static inline memo_entry *enc_slot(enc *e, const void *key) {
  memo_entry *s = memo_slot(e->m, key);
  if (!s) enc_fail(e, "out of memory");
  return s;
}

/* Records key in an empty slot from enc_slot (no memo change may happen in between). */
static inline void slot_fill(enc *e, memo_entry *s, const void *key, uint64_t val) {
  if (val > UINT32_MAX) enc_fail(e, "too many objects");
  memo_fill(e->m, s, key, (uint32_t)val);
}

/* A string's own bytes (T_SHORTSTR or T_STR), not a reference to an earlier copy. */
static inline void put_string(enc *e, const char *s, size_t len) {
  unsigned char *p = enc_room(e, 11 + len);
  if (len < 64) {
    *p++ = (unsigned char)(T_SHORTSTR + len);
    e->b->len++;
    e->b->len += len;
    /* short copies as fixed-size moves (two overlapping ones), cheaper than a memcpy
     * call; enc_room reserved 11 + len bytes and only bytes of s are read */
    if (len >= 8) {
      if (len <= 16) { memcpy(p, s, 8); memcpy(p + len - 8, s + len - 8, 8); return; }
    } else if (len >= 4) {
      memcpy(p, s, 4); memcpy(p + len - 4, s + len - 4, 4); return;
    } else {
      if (len) { p[0] = (unsigned char)s[0]; p[len - 1] = (unsigned char)s[len - 1]; }
      if (len == 3) p[1] = (unsigned char)s[1];
      return;
    }
    memcpy(p, s, len);
    return;
  } else {
    *p = T_STR;
    int n = varint_put(p + 1, len);
    p += 1 + n;
    e->b->len += 1 + n;
  }
  memcpy(p, s, len);
  e->b->len += len;
}

static void encode_string(enc *e, int idx) {
  size_t len;
  const char *s = lua_tolstring(e->L, idx, &len);
  if (len >= MEMO_STRLEN) {
    const void *p = lua_topointer(e->L, idx);
    memo_entry *slot = enc_slot(e, p);
    if (memo_hit(e->m, slot)) { put_ref(e, slot->val); return; }
    slot_fill(e, slot, p, e->nrefs++);
  }
  put_string(e, s, len);
}

static void encode_value(enc *e, int idx);
static void encode_compound(enc *e, int idx, int type);

/* Encodes nil, booleans, numbers and strings (type as from lua_type); 0 for others. */
static inline int encode_scalar(enc *e, int idx, int type) {
  lua_State *L = e->L;
  switch (type) {
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) put_int(e, lua_tointeger(L, idx));
      else put_float(e, lua_tonumber(L, idx));
      return 1;
    case LUA_TSTRING: encode_string(e, idx); return 1;
    case LUA_TBOOLEAN: put_byte(e, lua_toboolean(L, idx) ? T_TRUE : T_FALSE); return 1;
    case LUA_TNIL: put_byte(e, T_NIL); return 1;
    default: return 0;
  }
}

/* Each level uses at most STACK_PER_LEVEL Lua stack slots; room is made for several
 * levels at a time. */
#define STACK_PER_LEVEL 8
static inline void enter(enc *e) {
  if (++e->depth > MAX_DEPTH) enc_fail(e, "too deeply nested (more than %d levels)", MAX_DEPTH);
  if ((e->depth & 3) == 1 && !lua_checkstack(e->L, 5 * STACK_PER_LEVEL))
    enc_fail(e, "too deeply nested (Lua stack exhausted)");
}

static inline void encode_child(enc *e, int kind, int idx, const char *name, int vidx) {
  step *s = &e->path[e->nsteps++];
  s->kind = kind;
  s->idx = idx;
  s->name = name;
  encode_value(e, vidx);
  e->nsteps--;
}

/* encode_child for a value of known type: scalars need no path step. */
static inline void encode_child_t(enc *e, int kind, int idx, int vidx, int type) {
  if (encode_scalar(e, vidx, type)) return;
  step *s = &e->path[e->nsteps++];
  s->kind = kind;
  s->idx = idx;
  s->name = NULL;
  encode_compound(e, vidx, type);
  e->nsteps--;
}

/* package.loaded gets a metatable whose __newindex drops the cached map: require adds
 * modules through it, so a new module is noticed without scanning package.loaded on
 * every call. If package.loaded has a metatable of someone else's, fall back to a
 * fingerprint of its entries, checked on each use. */
static char watch_regkey;

static int loaded_newindex(lua_State *L) {
  lua_settop(L, 3);
  lua_rawset(L, 1);
  lua_pushnil(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &names_regkey);
  return 0;
}

/* Is package.loaded (at idx) watched? Installs the watch if it has no metatable. */
static int watch_loaded(lua_State *L, int loaded) {
  if (lua_getmetatable(L, loaded)) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &watch_regkey);
    int ours = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    return ours;
  }
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &watch_regkey) == LUA_TNIL) {
    lua_pop(L, 1);
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, loaded_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &watch_regkey);
  }
  lua_setmetatable(L, loaded);
  lua_pushnil(L);                                   /* built unwatched: may be stale */
  lua_rawsetp(L, LUA_REGISTRYINDEX, &names_regkey);
  return 1;
}

/* Makes sure e->nm is the map for the current package.loaded. */
static void need_names(enc *e, int force) {
  lua_State *L = e->L;
  if (e->nm && !force) return;
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  int loaded = lua_gettop(L);
  int watched = watch_loaded(L, loaded);
  uint64_t fp = watched ? 0 : loaded_fingerprint(L, loaded);
  names *nm = NULL;
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &names_regkey) == LUA_TUSERDATA && !force) {
    nm = lua_touserdata(L, -1);
    if (!watched && nm->fingerprint != fp) nm = NULL;
  }
  if (!nm) {
    lua_pop(L, 1);
    nm = build_names(L, loaded, fp);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &names_regkey);
    e->names_fresh = 1;
  }
  lua_replace(L, e->names_slot);                    /* anchors it for this call */
  lua_pop(L, 1);
  e->nm = nm;
}

/* Writes the object's name and returns 1 if it crosses by name. */
static int encode_named(enc *e, const void *p) {
  need_names(e, 0);
  size_t len;
  const unsigned char *rec = names_find(e->nm, p, &len);
  if (!rec) return 0;
  put_bytes(e, rec, len);
  return 1;
}

static void anchor_top(enc *e) {
  lua_State *L = e->L;
  if (lua_isnil(L, e->anchor_slot)) {
    lua_newtable(L);
    lua_replace(L, e->anchor_slot);
  }
  lua_rawseti(L, e->anchor_slot, ++e->anchor_n);
}

/* The object at idx has a metatable (at mt) with __luamp_handle (at top). */
static void encode_handle(enc *e, int idx, int mt) {
  lua_State *L = e->L;
  (void)mt;
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 1, 2, 0) != LUA_OK) {
    if (luamp_is_interrupted(L, -1)) lua_error(L);   /* a Ctrl-C is not the hook's failure */
    const char *msg = luaL_tolstring(L, -1, NULL);
    enc_fail(e, "handle hook failed: %s", msg);
  }
  size_t tlen;
  const char *tname = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &tlen) : NULL;
  if (!tname) enc_fail(e, "handle hook returned no type name");
  unsigned char *w = enc_room(e, 11 + tlen);
  w[0] = T_HANDLE;
  e->b->len += 1 + varint_put(w + 1, tlen);
  put_bytes(e, tname, tlen);
  enter(e);
  encode_child(e, STEP_PAYLOAD, 0, NULL, lua_gettop(L));
  e->depth--;
  anchor_top(e);                                    /* payload: addresses stay unique */
  lua_pop(L, 1);
  const void *p = lua_topointer(L, idx);
  slot_fill(e, enc_slot(e, p), p, e->nrefs++);
}

/* If the object at idx has a metatable, leaves it pushed and returns its index; if that
 * metatable makes the object a handle, encodes it and returns -1; else returns 0. */
static int metatable_or_handle(enc *e, int idx) {
  lua_State *L = e->L;
  if (!lua_getmetatable(L, idx)) return 0;
  int mt = lua_gettop(L);
  lua_pushliteral(L, "__luamp_handle");
  if (lua_rawget(L, mt) != LUA_TNIL) {
    encode_handle(e, idx, mt);
    lua_pop(L, 1);
    return -1;
  }
  lua_pop(L, 1);
  /* An object that only makes sense in the process that made it (a Pool) says so: the
   * error names it, not whatever of its insides the traversal happened to meet first. */
  lua_pushliteral(L, "__luamp_nosend");
  if (lua_rawget(L, mt) != LUA_TNIL && lua_toboolean(L, -1)) {
    lua_pushliteral(L, "__name");
    const char *name = lua_rawget(L, mt) == LUA_TSTRING ? lua_tostring(L, -1) : "object";
    enc_fail(e, "cannot send a %s (it works only in the process that made it)", name);
  }
  lua_pop(L, 1);
  return mt;
}

/* Rewrites the two bytes reserved at `at` as varints n1, n2, moving what follows. */
static void patch_counts(enc *e, size_t at, uint64_t n1, uint64_t n2) {
  unsigned char tmp[20];
  int k = varint_put(tmp, n1);
  k += varint_put(tmp + k, n2);
  if (k > 2) {
    enc_room(e, (size_t)k - 2);
    char *d = e->b->data;
    memmove(d + at + k, d + at + 2, e->b->len - at - 2);
    e->b->len += (size_t)k - 2;
  }
  memcpy(e->b->data + at, tmp, (size_t)k);
}

/* The table at idx as the plain list {t[i], ..., t[j]} (nils in place; its other keys and
 * its metatable not sent): a Pool chunk's arguments straight from the caller's list, a
 * chunk's results from the worker's table, without building a table for them or walking
 * them with lua_next. */
#define SLICE_BATCH 64
static void encode_slice(enc *e, int idx, memo_entry *s, const void *p) {
  lua_State *L = e->L;
  slot_fill(e, s, p, e->nrefs++);
  enter(e);
  put_byte(e, T_TABLE);
  lua_Integer i = e->slice_i, j = e->slice_j;
  put_varint(e, (uint64_t)(j - i + 1));
  put_varint(e, 0);
  int k = lua_gettop(L) + 1, v = k + 1;             /* the key (for error paths), the values */
  lua_pushnil(L);
  /* the items are fetched SLICE_BATCH at a time and popped together: a pop per item was
   * a sixth of the instructions of a big map's chunk */
  if (!lua_checkstack(L, SLICE_BATCH + 1)) enc_fail(e, "out of memory (Lua stack)");
  for (lua_Integer x = i; x <= j;) {
    int m = j - x + 1 < SLICE_BATCH ? (int)(j - x + 1) : SLICE_BATCH;
    for (int q = 0; q < m; q++) lua_geti(L, idx, x + q);
    for (int q = 0; q < m; q++) {
      int vq = v + q;
      if (lua_isinteger(L, vq)) {
        put_int(e, lua_tointeger(L, vq));
        continue;
      }
      int t = lua_type(L, vq);
      if (!encode_scalar(e, vq, t)) {
        lua_pushinteger(L, x + q - i + 1);
        lua_replace(L, k);
        encode_child_t(e, STEP_KEY, k, vq, t);
        lua_settop(L, v + m - 1);
      }
    }
    lua_settop(L, k);
    x += m;
  }
  lua_settop(L, k - 1);
  e->depth--;
}

static void encode_table(enc *e, int idx) {
  lua_State *L = e->L;
  const void *p = lua_topointer(L, idx);
  memo_entry *s = enc_slot(e, p);
  if (memo_hit(e->m, s)) { put_ref(e, s->val); return; }
  if (p == e->slice) { encode_slice(e, idx, s, p); return; }
  if (p == e->globals) { put_byte(e, T_GLOBALS); return; }
  if (encode_named(e, p)) return;
  int mt = metatable_or_handle(e, idx);
  if (mt < 0) return;
  slot_fill(e, s, p, e->nrefs++);                   /* s is still valid: no memo change */
  enter(e);
  put_byte(e, mt ? T_TABLE_MT : T_TABLE);
  size_t at = e->b->len;
  enc_room(e, 2);
  e->b->len += 2;
  lua_Integer narr = 0;
  uint64_t nhash = 0;
  int in_array = 1;
  int k = lua_gettop(L) + 1, v = k + 1;             /* where lua_next puts key and value */
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (in_array) {
      if (lua_isinteger(L, k) && lua_tointeger(L, k) == narr + 1) {
        narr++;
        if (lua_isinteger(L, v)) put_int(e, lua_tointeger(L, v));   /* int arrays: fewest calls */
        else encode_child_t(e, STEP_KEY, k, v, lua_type(L, v));
        lua_settop(L, k);
        continue;
      }
      in_array = 0;
    }
    nhash++;
    int kt = lua_type(L, k);
    if (kt == LUA_TSTRING) encode_string(e, k);
    else encode_child_t(e, STEP_KEYOF, k, k, kt);
    encode_child_t(e, STEP_KEY, k, v, lua_type(L, v));
    lua_settop(L, k);
  }
  if (mt) {
    encode_child(e, STEP_META, idx, NULL, mt);
    lua_pop(L, 1);
  }
  patch_counts(e, at, (uint64_t)narr, nhash);
  e->depth--;
}

static int dump_writer(lua_State *L, const void *p, size_t sz, void *ud) {
  (void)L;
  luamp_buf *b = ud;
  if (luamp_buf_reserve(b, sz)) return 1;
  memcpy(b->data + b->len, p, sz);
  b->len += sz;
  return 0;
}

static void encode_function(enc *e, int idx) {
  lua_State *L = e->L;
  const void *p = lua_topointer(L, idx);
  memo_entry *s = enc_slot(e, p);
  if (memo_hit(e->m, s)) { put_ref(e, s->val); return; }
  if (encode_named(e, p)) return;
  if (lua_iscfunction(L, idx)) {
    /* a module may have gained the field since the map was built: look once more */
    if (!e->names_fresh) {
      need_names(e, 1);
      if (encode_named(e, p)) return;
    }
    enc_fail(e, "cannot send a C function that is not a field of a loaded module");
  }
  uint64_t self = e->nrefs++;
  slot_fill(e, s, p, self);
  enter(e);
  put_byte(e, T_FUNC);
  size_t at = e->b->len;
  enc_room(e, 5);
  e->b->len += 5;                                   /* length, as a 5-byte varint */
  lua_pushvalue(L, idx);
  if (lua_dump(L, dump_writer, e->b, 0)) enc_fail(e, "out of memory");
  lua_pop(L, 1);
  uint64_t n = e->b->len - at - 5;
  if (n >> 35) enc_fail(e, "function too large");
  for (int i = 0; i < 5; i++) e->b->data[at + i] = (char)(((n >> (7 * i)) & 0x7f) | (i < 4 ? 0x80 : 0));
  lua_Debug ar;
  lua_pushvalue(L, idx);
  lua_getinfo(L, ">u", &ar);
  put_byte(e, ar.nups);
  for (int i = 1; i <= ar.nups; i++) {
    const void *id = lua_upvalueid(L, idx, i);
    memo_entry *u = enc_slot(e, id);
    if (memo_hit(e->m, u)) {
      uint64_t owner = u->val;
      put_byte(e, UP_SHARED);
      put_varint(e, owner >> 8);
      put_byte(e, (unsigned char)(owner & 0xff));
      continue;
    }
    if (self >= (1u << 24)) enc_fail(e, "too many functions");
    slot_fill(e, u, id, (self << 8) | (uint64_t)i);
    put_byte(e, UP_NEW);
    const char *name = lua_getupvalue(L, idx, i);
    encode_child(e, STEP_UPVAL, 0, name, lua_gettop(L));
    lua_pop(L, 1);
  }
  e->depth--;
}

static void encode_userdata(enc *e, int idx) {
  lua_State *L = e->L;
  memo_entry *s = enc_slot(e, lua_topointer(L, idx));
  if (memo_hit(e->m, s)) { put_ref(e, s->val); return; }
  int mt = metatable_or_handle(e, idx);
  if (mt < 0) return;
  if (mt && lua_getfield(L, mt, "__name") == LUA_TSTRING)
    enc_fail(e, "cannot send a userdata (%s)", lua_tostring(L, -1));
  enc_fail(e, "cannot send a userdata");
}

static void encode_compound(enc *e, int idx, int type) {
  lua_State *L = e->L;
  switch (type) {
    case LUA_TTABLE: encode_table(e, idx); break;
    case LUA_TFUNCTION: encode_function(e, idx); break;
    case LUA_TUSERDATA: encode_userdata(e, idx); break;
    case LUA_TLIGHTUSERDATA: enc_fail(e, "cannot send a light userdata");
    case LUA_TTHREAD: enc_fail(e, "cannot send a coroutine");
    default: enc_fail(e, "cannot send a %s", luaL_typename(L, idx));
  }
}

static void encode_value(enc *e, int idx) {
  int type = lua_type(e->L, idx);
  if (!encode_scalar(e, idx, type)) encode_compound(e, idx, type);
}

/* Encodes the value at idx into e->b. Needs two free stack slots at e->names_slot and
 * e->anchor_slot (nil). Raises on failure. */
static void encode_root(enc *e, int idx) {
  lua_State *L = e->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  e->globals = lua_topointer(L, -1);
  lua_pop(L, 1);
  put_byte(e, CODEC_VERSION);
  encode_value(e, idx);
}

/* lua_pcall'd: (enc*, value). */
static int encode_protected(lua_State *L) {
  enc *e = lua_touserdata(L, 1);
  lua_settop(L, 4);
  e->names_slot = 3;
  e->anchor_slot = 4;
  encode_root(e, 2);
  return 0;
}

/* Leaves a luamp error object at the top in place of whatever was raised. */
static void normalize_error(lua_State *L) {
  if (lua_type(L, -1) == LUA_TTABLE && lua_getmetatable(L, -1)) {
    luaL_getmetatable(L, "luamp.Error");
    int ours = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    if (ours) return;
  }
  const char *msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : luaL_typename(L, -1);
  luamp_error_push(L, "Serialize", "%s", msg);
  lua_remove(L, -2);
}

/* The carrier list (handles.c) is installed for the pcall only: NULL for a plain encode,
 * so handles nested in it never put descriptors in a list they do not travel with. */
/* A value that is nil, a boolean, a number or a string is encoded here, without the
 * pcall, the memo or the names, into the same bytes as encode_root writes (a root
 * string is never a reference): for a queue's put of a small item, setting those up was
 * half the instructions. 1 when done; 0 when the value needs the full encoder (or memory
 * ran short: the full encoder then reports it). Never raises. */
static int encode_plain(lua_State *L, int idx, luamp_buf *b) {
  int type = lua_type(L, idx);
  size_t len = 0;
  const char *s = NULL;
  if (type == LUA_TSTRING) s = lua_tolstring(L, idx, &len);
  else if (type != LUA_TNUMBER && type != LUA_TBOOLEAN && type != LUA_TNIL) return 0;
  if (len > SIZE_MAX - 32 || luamp_buf_reserve(b, 32 + len)) return 0;
  enc e;                      /* only L and b: the room is reserved, nothing can fail */
  e.L = L;
  e.b = b;
  put_byte(&e, CODEC_VERSION);
  if (s) put_string(&e, s, len);
  else encode_scalar(&e, idx, type);
  return 1;
}

size_t luamp_encode_plain(lua_State *L, int idx, unsigned char *head, const char **tail,
                          size_t *tail_len) {
  int type = lua_type(L, idx);
  *tail = NULL;
  *tail_len = 0;
  head[0] = CODEC_VERSION;
  if (type == LUA_TSTRING) {
    size_t len;
    *tail = lua_tolstring(L, idx, &len);
    *tail_len = len;
    if (len < 64) {
      head[1] = (unsigned char)(T_SHORTSTR + len);
      return 2;
    }
    head[1] = T_STR;
    return 2 + (size_t)varint_put(head + 2, len);
  }
  if (type != LUA_TNUMBER && type != LUA_TBOOLEAN && type != LUA_TNIL) return 0;
  /* a buffer with room for any scalar: nothing in encode_scalar can fail */
  luamp_buf b = {(char *)head, 1, LUAMP_PLAIN_HEAD};
  enc e;
  e.L = L;
  e.b = &b;
  encode_scalar(&e, idx, type);
  return b.len;
}

static int encode_with(lua_State *L, int idx, luamp_buf *b, const char *root, luamp_fdlist *fds) {
  idx = lua_absindex(L, idx);
  if (encode_plain(L, idx, b)) {
    if (fds) fds->n = 0;
    return 0;
  }
  enc e;
  memo m;
  memset(&m, 0, sizeof m);
  m.gen = 1;
  /* field by field: e.path is large and only used up to e.nsteps */
  e.L = L;
  e.b = b;
  e.m = &m;
  e.root = root ? root : "value";
  e.nrefs = 0;
  e.depth = e.nsteps = 0;
  e.globals = NULL;
  e.nm = NULL;
  e.names_fresh = 0;
  e.names_slot = e.anchor_slot = 0;
  e.anchor_n = 0;
  if (!lua_checkstack(L, 8)) {
    luamp_error_push(L, "Serialize", "Lua stack exhausted");
    return -1;
  }
  lua_pushcfunction(L, encode_protected);
  lua_pushlightuserdata(L, &e);
  lua_pushvalue(L, idx);
  luamp_fdlist *prev = luamp_fds_send_begin(fds);
  int rc = lua_pcall(L, 2, 0, 0);
  luamp_fds_send_end(prev);
  memo_free(&m);
  if (rc == LUA_OK) return 0;
  normalize_error(L);
  return -1;
}

int luamp_encodex(lua_State *L, int idx, luamp_buf *b, const char *root) {
  return encode_with(L, idx, b, root, NULL);
}

int luamp_encode_fds(lua_State *L, int idx, luamp_buf *b, const char *root, luamp_fdlist *out) {
  return encode_with(L, idx, b, root, out);
}

int luamp_encode(lua_State *L, int idx, luamp_buf *b) {
  return luamp_encodex(L, idx, b, NULL);
}

/* ---- decoder --------------------------------------------------------------------- */

typedef struct dec {
  lua_State *L;
  const unsigned char *start, *p, *end;
  int flags, depth;
  uint64_t nrefs;
  size_t budget;           /* input bytes not yet claimed by a table preallocation */
  int refs_slot;
} dec;

static int dec_fail(dec *d, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static int dec_fail(dec *d, const char *fmt, ...) {
  char msg[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  luamp_raise(d->L, "Serialize", "malformed data at byte %zu: %s",
              (size_t)(d->p - d->start), msg);
}

static inline void need(dec *d, uint64_t n) {
  if ((uint64_t)(d->end - d->p) < n) dec_fail(d, "truncated");
}

static uint64_t get_varint(dec *d) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    need(d, 1);
    unsigned char c = *d->p++;
    if (shift == 63 && c > 1) break;
    v |= (uint64_t)(c & 0x7f) << shift;
    if (!(c & 0x80)) return v;
  }
  dec_fail(d, "bad varint");
}

/* A length that the remaining input must be able to hold, `unit` bytes per item. */
static size_t get_count(dec *d, size_t unit) {
  uint64_t n = get_varint(d);
  if (n > (uint64_t)(d->end - d->p) / unit) dec_fail(d, "length exceeds input");
  return (size_t)n;
}

static void dec_register(dec *d, int idx) {
  lua_State *L = d->L;
  if (lua_isnil(L, d->refs_slot)) {
    lua_newtable(L);
    lua_replace(L, d->refs_slot);
  }
  lua_pushvalue(L, idx);
  lua_rawseti(L, d->refs_slot, (lua_Integer)++d->nrefs);
}

static void dec_enter(dec *d) {
  if (++d->depth > MAX_DEPTH) dec_fail(d, "too deeply nested");
  if (!lua_checkstack(d->L, 8)) dec_fail(d, "too deeply nested (Lua stack exhausted)");
}

static void decode_value(dec *d);

static inline void decode_string(dec *d, size_t len) {
  need(d, len);
  lua_pushlstring(d->L, (const char *)d->p, len);
  d->p += len;
  if (len >= MEMO_STRLEN) dec_register(d, -1);
}

/* How many slots to preallocate for n items of at least `unit` input bytes each. Nested
 * tables may all claim the same bytes; the budget (the input's size) makes the total
 * preallocated no more than genuine items could need, and claims beyond it grow as
 * items actually arrive. */
static size_t prealloc(dec *d, size_t n, size_t unit) {
  if (n > d->budget / unit || n > INT_MAX / 2) return 0;
  d->budget -= n * unit;
  return n;
}

static void decode_table(dec *d, int with_mt) {
  lua_State *L = d->L;
  size_t narr = get_count(d, 1);
  size_t nhash = get_count(d, 2);
  dec_enter(d);
  lua_createtable(L, (int)prealloc(d, narr, 1), (int)prealloc(d, nhash, 2));
  int t = lua_gettop(L);
  dec_register(d, t);
  for (size_t i = 1; i <= narr; i++) {
    decode_value(d);
    lua_rawseti(L, t, (lua_Integer)i);
  }
  for (size_t i = 0; i < nhash; i++) {
    decode_value(d);
    int kt = lua_type(L, -1);
    if (kt == LUA_TNIL || (kt == LUA_TNUMBER && !lua_isinteger(L, -1) && isnan(lua_tonumber(L, -1))))
      dec_fail(d, "invalid table key");
    decode_value(d);
    lua_rawset(L, t);
  }
  if (with_mt) {
    decode_value(d);
    if (!lua_istable(L, -1)) dec_fail(d, "metatable is not a table");
    lua_setmetatable(L, t);
  }
  d->depth--;
}

typedef struct chunk { const char *p; size_t n; } chunk;
static const char *chunk_reader(lua_State *L, void *ud, size_t *size) {
  (void)L;
  chunk *c = ud;
  *size = c->n;
  c->n = 0;
  return *size ? c->p : NULL;
}

static int is_lua_function(lua_State *L, int idx) {
  return lua_type(L, idx) == LUA_TFUNCTION && !lua_iscfunction(L, idx);
}

/* Raises unless the decode's flags allow what the tag just read carries. */
static void allow(dec *d, int forbidden_by, const char *what) {
  if (d->flags & forbidden_by) {
    d->p--;                                         /* the error names the tag's offset */
    dec_fail(d, "%s not accepted from an untrusted peer", what);
  }
}

static void decode_function(dec *d) {
  lua_State *L = d->L;
  allow(d, LUAMP_DECODE_NO_CODE, "functions are");
  size_t len = get_count(d, 1);
  dec_enter(d);
  chunk c = { (const char *)d->p, len };
  if (lua_load(L, chunk_reader, &c, "=(luamp codec)", "b") != LUA_OK)
    dec_fail(d, "bad bytecode: %s", lua_tostring(L, -1));
  d->p += len;
  int f = lua_gettop(L);
  dec_register(d, f);
  lua_Debug ar;
  lua_pushvalue(L, f);
  lua_getinfo(L, ">u", &ar);
  need(d, 1);
  if (*d->p++ != ar.nups) dec_fail(d, "upvalue count does not match the bytecode");
  for (int i = 1; i <= ar.nups; i++) {
    need(d, 1);
    int kind = *d->p++;
    if (kind == UP_NEW) {
      decode_value(d);
      lua_setupvalue(L, f, i);
    } else if (kind == UP_SHARED) {
      uint64_t owner = get_varint(d);
      need(d, 1);
      int n = *d->p++;
      if (owner >= d->nrefs) dec_fail(d, "bad upvalue reference");
      lua_rawgeti(L, d->refs_slot, (lua_Integer)owner + 1);
      if (!is_lua_function(L, -1) || n < 1 || !lua_getupvalue(L, -1, n))
        dec_fail(d, "bad upvalue reference");
      lua_pop(L, 1);
      lua_upvaluejoin(L, f, i, lua_gettop(L), n);
      lua_pop(L, 1);
    } else {
      dec_fail(d, "bad upvalue kind");
    }
  }
  d->depth--;
}

/* require-free lookup in package.loaded (LUAMP_DECODE_NO_CODE) or require (trusted). */
static void decode_named(dec *d) {
  lua_State *L = d->L;
  allow(d, LUAMP_DECODE_NO_LIVE, "modules and their fields are");
  int no_code = d->flags & LUAMP_DECODE_NO_CODE;
  size_t modlen = get_count(d, 1);
  const char *mod = (const char *)d->p;
  d->p += modlen;
  uint64_t fl = get_varint(d);
  if (fl > (uint64_t)(d->end - d->p) + 1) dec_fail(d, "length exceeds input");
  const char *field = fl ? (const char *)d->p : NULL;
  d->p += fl ? fl - 1 : 0;
  lua_pushlstring(L, mod, modlen);
  int name = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushvalue(L, name);
  if (lua_rawget(L, -2) == LUA_TNIL) {
    if (no_code) dec_fail(d, "module '%s' is not loaded", lua_tostring(L, name));
    lua_pop(L, 1);
    lua_getglobal(L, "require");
    lua_pushvalue(L, name);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
      if (luamp_is_interrupted(L, -1)) lua_error(L);
      dec_fail(d, "cannot require '%s': %s", lua_tostring(L, name), luaL_tolstring(L, -1, NULL));
    }
  }
  if (field) {
    if (!lua_istable(L, -1)) dec_fail(d, "module '%s' is not a table", lua_tostring(L, name));
    lua_pushlstring(L, field, (size_t)fl - 1);
    if (no_code) lua_rawget(L, -2);
    else lua_gettable(L, -2);
    if (lua_isnil(L, -1))
      dec_fail(d, "module '%s' has no field '%.*s'", lua_tostring(L, name),
               (int)(fl - 1), field);
  }
  int t = lua_type(L, -1);
  if (t != LUA_TTABLE && t != LUA_TFUNCTION)       /* as the encoder names nothing else */
    dec_fail(d, "named value '%s' is a %s", lua_tostring(L, name), lua_typename(L, t));
  if (no_code && t == LUA_TFUNCTION)
    dec_fail(d, "functions are not accepted from an untrusted peer");
  lua_replace(L, name);
  lua_settop(L, name);
}

static void decode_handle(dec *d) {
  lua_State *L = d->L;
  allow(d, LUAMP_DECODE_NO_LIVE, "handles (luamp objects) are");
  size_t tlen = get_count(d, 1);
  lua_pushlstring(L, (const char *)d->p, tlen);
  d->p += tlen;
  int tname = lua_gettop(L);
  dec_enter(d);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUAMP_HANDLES_KEY);
  lua_pushvalue(L, tname);
  if (lua_rawget(L, -2) != LUA_TFUNCTION) {
    /* luamp's parts load on first use (luamp.main), and the one that rebuilds this type
     * may not have been used yet: load them all, then look again */
    lua_pop(L, 1);
    if (lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE) == LUA_TTABLE &&
        lua_getfield(L, -1, "luamp.main") == LUA_TTABLE &&
        lua_getfield(L, -1, "_load_all") == LUA_TFUNCTION) {
      if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
        if (luamp_is_interrupted(L, -1)) lua_error(L);
        lua_pop(L, 1);
      }
      lua_pop(L, 2);
    } else {
      lua_settop(L, tname + 1);
    }
    lua_pushvalue(L, tname);
    if (lua_rawget(L, -2) != LUA_TFUNCTION)
      dec_fail(d, "unknown handle type '%s'", lua_tostring(L, tname));
  }
  decode_value(d);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    if (luamp_is_interrupted(L, -1)) lua_error(L);
    dec_fail(d, "cannot rebuild a '%s' handle: %s", lua_tostring(L, tname),
             luaL_tolstring(L, -1, NULL));
  }
  lua_replace(L, tname);
  lua_settop(L, tname);
  dec_register(d, tname);
  d->depth--;
}

static void decode_value(dec *d) {
  lua_State *L = d->L;
  need(d, 1);
  unsigned t = *d->p++;
  if (t >= T_FIXINT) { lua_pushinteger(L, (lua_Integer)(t - T_FIXINT)); return; }
  if (t >= T_SHORTSTR) { decode_string(d, t - T_SHORTSTR); return; }
  switch (t) {
    case T_NIL: lua_pushnil(L); return;
    case T_FALSE: lua_pushboolean(L, 0); return;
    case T_TRUE: lua_pushboolean(L, 1); return;
    case T_INT8: need(d, 1); lua_pushinteger(L, (int8_t)d->p[0]); d->p += 1; return;
    case T_INT16: need(d, 2); lua_pushinteger(L, (int16_t)load_le(d->p, 2)); d->p += 2; return;
    case T_INT32: need(d, 4); lua_pushinteger(L, (int32_t)load_le(d->p, 4)); d->p += 4; return;
    case T_INT64: need(d, 8); lua_pushinteger(L, (lua_Integer)load_le(d->p, 8)); d->p += 8; return;
    case T_FLOAT: {
      need(d, 8);
      uint64_t bits = load_le(d->p, 8);
      double v;
      memcpy(&v, &bits, 8);
      lua_pushnumber(L, (lua_Number)v);
      d->p += 8;
      return;
    }
    case T_STR: decode_string(d, get_count(d, 1)); return;
    case T_TABLE: decode_table(d, 0); return;
    case T_TABLE_MT: decode_table(d, 1); return;
    case T_REF: {
      uint64_t ref = get_varint(d);
      if (ref >= d->nrefs) dec_fail(d, "reference to an unknown object");
      lua_rawgeti(L, d->refs_slot, (lua_Integer)ref + 1);
      return;
    }
    case T_FUNC: decode_function(d); return;
    case T_GLOBALS:
      allow(d, LUAMP_DECODE_NO_LIVE, "the global table is");
      lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
      return;
    case T_NAMED: decode_named(d); return;
    case T_HANDLE: decode_handle(d); return;
    default: d->p--; dec_fail(d, "unknown tag 0x%02x", t);
  }
}

static void dec_init(dec *d, lua_State *L, const char *data, size_t len, int flags) {
  memset(d, 0, sizeof *d);
  d->L = L;
  d->start = d->p = (const unsigned char *)data;
  d->end = d->p + len;
  d->flags = flags;
  d->budget = len;
}

/* The value after the version byte, and nothing after it. */
static void decode_root_rest(dec *d) {
  decode_value(d);
  if (d->p != d->end) dec_fail(d, "%zu trailing bytes", (size_t)(d->end - d->p));
}

/* Pushes the decoded value. Needs a free (nil) stack slot at d->refs_slot. Raises on
 * failure; holds no C resources. */
static void decode_root(dec *d) {
  if (d->p == d->end) dec_fail(d, "empty input");
  if (*d->p != CODEC_VERSION) dec_fail(d, "unsupported format version %d", *d->p);
  d->p++;
  decode_value(d);
  if (d->p != d->end) dec_fail(d, "%zu trailing bytes", (size_t)(d->end - d->p));
}

/* lua_pcall'd: (dec*). Leaves the value at the top. */
static int decode_protected(lua_State *L) {
  dec *d = lua_touserdata(L, 1);
  lua_settop(L, 2);
  d->refs_slot = 2;
  decode_root(d);
  return 1;
}

int luamp_decodex(lua_State *L, const char *data, size_t len, int flags) {
  return luamp_decode_fds(L, data, len, flags, NULL);
}

/* A payload that is one number, boolean or nil is pushed here, without the pcall (the
 * pushes cannot fail: no allocation); 1 when done, 0 for anything else. */
static int decode_plain(lua_State *L, const unsigned char *p, size_t len) {
  if (len < 2 || p[0] != CODEC_VERSION) return 0;
  unsigned t = p[1];
  if (t >= T_FIXINT) {
    if (len != 2) return 0;
    lua_pushinteger(L, (lua_Integer)(t - T_FIXINT));
    return 1;
  }
  switch (t) {
    case T_NIL: if (len != 2) return 0; lua_pushnil(L); return 1;
    case T_FALSE: if (len != 2) return 0; lua_pushboolean(L, 0); return 1;
    case T_TRUE: if (len != 2) return 0; lua_pushboolean(L, 1); return 1;
    case T_INT8: if (len != 3) return 0; lua_pushinteger(L, (int8_t)p[2]); return 1;
    case T_INT16: if (len != 4) return 0; lua_pushinteger(L, (int16_t)load_le(p + 2, 2)); return 1;
    case T_INT32: if (len != 6) return 0; lua_pushinteger(L, (int32_t)load_le(p + 2, 4)); return 1;
    case T_INT64:
      if (len != 10) return 0;
      lua_pushinteger(L, (lua_Integer)load_le(p + 2, 8));
      return 1;
    case T_FLOAT: {
      if (len != 10) return 0;
      uint64_t bits = load_le(p + 2, 8);
      double v;
      memcpy(&v, &bits, 8);
      lua_pushnumber(L, (lua_Number)v);
      return 1;
    }
    default: return 0;
  }
}

int luamp_decode_fds(lua_State *L, const char *data, size_t len, int flags, luamp_fdlist *in) {
  if (!lua_checkstack(L, 8)) {
    luamp_error_push(L, "Serialize", "Lua stack exhausted");
    return -1;
  }
  if (decode_plain(L, (const unsigned char *)data, len)) return 0;
  dec d;
  dec_init(&d, L, data, len, flags);
  lua_pushcfunction(L, decode_protected);
  lua_pushlightuserdata(L, &d);
  luamp_fdlist *prev = luamp_fds_recv_begin(in);
  int rc = lua_pcall(L, 1, 1, 0);
  luamp_fds_recv_end(prev);
  if (rc == LUA_OK) return 0;
  normalize_error(L);
  return -1;
}

int luamp_decode_plain(lua_State *L, const char *data, size_t len) {
  return decode_plain(L, (const unsigned char *)data, len);
}

int luamp_decoded_string(const char *data, size_t len, const char **s, size_t *slen) {
  const unsigned char *p = (const unsigned char *)data, *end = p + len;
  if (len < 2 || p[0] != CODEC_VERSION) return 0;
  if (p[1] >= T_SHORTSTR && p[1] < T_FIXINT) {
    if (len != 2 + (size_t)(p[1] - T_SHORTSTR)) return 0;
    *s = data + 2;
    *slen = len - 2;
    return 1;
  }
  if (p[1] != T_STR) return 0;
  /* the varint as get_varint reads it (redundant continuation bytes allowed) */
  uint64_t n = 0;
  int shift = 0;
  p += 2;
  for (;; shift += 7) {
    if (p == end || shift > 63) return 0;
    unsigned char c = *p++;
    if (shift == 63 && c > 1) return 0;
    n |= (uint64_t)(c & 0x7f) << shift;
    if (!(c & 0x80)) break;
  }
  if (n != (uint64_t)(end - p)) return 0;
  *s = (const char *)p;
  *slen = (size_t)n;
  return 1;
}

int luamp_decode(lua_State *L, const char *data, size_t len) {
  return luamp_decodex(L, data, len, 0);
}

/* ---- Lua bindings ---------------------------------------------------------------- */

/* luamp.dumps works without a pcall: its buffer and memo belong to a userdata (one per
 * state, reused between calls; a fresh one when a handle hook calls dumps meanwhile)
 * that is closed on return or error and freed by the GC. */
typedef struct scratch {
  luamp_buf b;
  memo m;
  int busy;
  luamp_fdlist fl;            /* _core.dumpx: the descriptors collected */
  luamp_fdlist *prev_fl;      /* the carrier list to put back when closed */
} scratch;

#define SCRATCH_MT "luamp.codec.scratch"
#define SCRATCH_KEEP (4u << 20)    /* buffer bytes kept between calls (a Pool worker
                                      encodes a chunk's ~1 MB of results again and again) */
#define SCRATCH_MEMO_KEEP (1u << 16)  /* memo entries kept between calls */

static char scratch_regkey;

static int scratch_gc(lua_State *L) {
  scratch *s = lua_touserdata(L, 1);
  luamp_buf_free(&s->b);
  memo_free(&s->m);
  return 0;
}

static int scratch_close(lua_State *L) {
  scratch *s = lua_touserdata(L, 1);
  if (s->busy) luamp_fds_send_end(s->prev_fl);
  s->busy = 0;
  if (s->b.cap > SCRATCH_KEEP) luamp_buf_free(&s->b);
  if (s->m.cap > SCRATCH_MEMO_KEEP) memo_free(&s->m);
  s->b.len = 0;
  return 0;
}

static scratch *push_scratch(lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &scratch_regkey) == LUA_TUSERDATA) {
    scratch *s = lua_touserdata(L, -1);
    if (!s->busy) return s;
  }
  int cache = lua_isnil(L, -1);
  lua_pop(L, 1);
  scratch *s = lua_newuserdatauv(L, sizeof *s, 0);
  memset(s, 0, sizeof *s);
  s->m.gen = 1;
  if (luaL_newmetatable(L, SCRATCH_MT)) {
    lua_pushcfunction(L, scratch_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, scratch_close);
    lua_setfield(L, -2, "__close");
  }
  lua_setmetatable(L, -2);
  if (cache) {
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &scratch_regkey);
  }
  return s;
}

/* luamp.dumps(v) -> string; as _core.dumpx(v, [root], [t, i, j]) (upvalue true) ->
 * string, fds|nil, where fds is a bundle (handles.c) holding duplicates of the
 * descriptors the value's handles need, for a transport that sends them along later, and
 * the table t, where met in v (v itself may be t), is written as the plain list {t[i],
 * ..., t[j]} (see encode_slice). */
static scratch *dump_to_scratch(lua_State *L, int carry);

/* Pushes a bundle (handles.c) with duplicates of the descriptors s collected. */
static int push_fds_bundle(lua_State *L, scratch *s) {
  luamp_fdlist *out = luamp_fds_push_bundle(L);
  for (int i = 0; i < s->fl.n; i++) {
    int fd = fcntl(s->fl.fd[i], F_DUPFD_CLOEXEC, 0);
    if (fd < 0) luamp_raise_errno(L, "Serialize", "dumpx: dup", errno);   /* the bundle owns the rest */
    out->fd[out->n++] = fd;
  }
  return 1;
}

static int l_dumps(lua_State *L) {
  int carry = lua_toboolean(L, lua_upvalueindex(1));
  scratch *s = dump_to_scratch(L, carry);
  lua_pushlstring(L, s->b.data, s->b.len);
  if (!carry || s->fl.n == 0) return 1;
  return 1 + push_fds_bundle(L, s);
}

int luamp_dumpx_scratch(lua_State *L, const char **data, size_t *len) {
  scratch *s = dump_to_scratch(L, 1);
  *data = s->b.data;
  *len = s->b.len;
  return s->fl.n;
}

int luamp_dumpx_push_fds(lua_State *L) {
  return push_fds_bundle(L, lua_touserdata(L, 3));
}

/* Encodes the value at 1 as l_dumps says (arguments at 1..5) into the state's scratch
 * buffer, which stays on the stack (at 3) as a to-be-closed slot: the bytes are good
 * until the calling C function returns. */
static scratch *dump_to_scratch(lua_State *L, int carry) {
  luaL_checkany(L, 1);
  /* luamp's own callers name the value for error messages ("args", "the task function") */
  char root[64];
  snprintf(root, sizeof root, "%s", luaL_optstring(L, 2, "value"));
  lua_Integer si = 0, sj = 0;
  lua_settop(L, 5);
  if (carry && !lua_isnil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    si = luaL_checkinteger(L, 4);
    sj = luaL_checkinteger(L, 5);
    if (sj < si - 1 || sj - si >= INT_MAX) luamp_raise(L, "Value", "dumpx: bad slice %lld..%lld",
                                                       (long long)si, (long long)sj);
  } else {
    lua_pushnil(L);
    lua_replace(L, 3);
  }
  lua_copy(L, 3, 2);                                /* the slice's table, anchored (or nil) */
  lua_settop(L, 2);
  scratch *s = push_scratch(L);
  s->prev_fl = luamp_fds_send_begin(carry ? &s->fl : NULL);
  s->busy = 1;
  lua_toclose(L, 3);
  lua_settop(L, 5);
  enc e;
  e.L = L;
  e.b = &s->b;
  e.m = &s->m;
  e.root = root;
  e.nrefs = 0;
  e.depth = e.nsteps = 0;
  e.nm = NULL;
  e.names_fresh = 0;
  e.names_slot = 4;
  e.anchor_slot = 5;
  e.anchor_n = 0;
  e.slice = lua_istable(L, 2) ? lua_topointer(L, 2) : NULL;
  e.slice_i = si;
  e.slice_j = sj;
  s->b.len = 0;
  memo_clear(&s->m);
  encode_root(&e, 1);
  return s;
}

static int loads_with(lua_State *L, int flags) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_settop(L, 2);
  lua_pushnil(L);                                   /* refs_slot: filled on first need */
  dec d;
  dec_init(&d, L, s, len, flags);
  d.refs_slot = 3;
  decode_root(&d);
  return 1;
}

/* luamp.loads(s, [{trusted = true}]) -> v: bytes from anywhere, so untrusted unless the
 * caller vouches for them. */
static int l_loads(lua_State *L) {
  int flags = LUAMP_DECODE_UNTRUSTED;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    int t = lua_getfield(L, 2, "trusted");
    if (t != LUA_TNIL && t != LUA_TBOOLEAN)
      luamp_raise(L, "Value", "loads: option 'trusted' must be a boolean, not a %s",
                  lua_typename(L, t));
    if (lua_toboolean(L, -1)) flags = 0;
  }
  return loads_with(L, flags);
}

/* _core.loads_trusted(s) -> v: for luamp's own messages between its processes (pool
 * tasks and results), which carry functions and handles. */
static int l_loads_trusted(lua_State *L) { return loads_with(L, 0); }

/* After a T_TABLE tag: the table's items (keys 1..n only, no metatable) go straight into
 * the table at dst, item i at dst[pos+i-1] (all n of them: a hole becomes nil); dst
 * stands in for the table as a reference. */
static void decode_items_into(dec *d, int dst, lua_Integer pos, lua_Integer n) {
  lua_State *L = d->L;
  size_t narr = get_count(d, 1);
  size_t nhash = get_count(d, 2);
  if (narr > (uint64_t)n) dec_fail(d, "more than %lld items", (long long)n);
  dec_enter(d);
  dec_register(d, dst);
  for (size_t i = 1; i <= narr; i++) {
    decode_value(d);
    lua_rawseti(L, dst, pos + (lua_Integer)i - 1);
  }
  /* the items past the list part are holes unless the pairs name them: dst may be a
   * table reused from an earlier chunk */
  for (lua_Integer k = (lua_Integer)narr + 1; k <= n; k++) {
    lua_pushnil(L);
    lua_rawseti(L, dst, pos + k - 1);
  }
  for (size_t i = 0; i < nhash; i++) {
    decode_value(d);
    int isint;
    lua_Integer k = lua_tointegerx(L, -1, &isint);
    if (!isint || lua_type(L, -1) != LUA_TNUMBER || k < 1 || k > n)
      dec_fail(d, "a key that is not an item number 1..%lld", (long long)n);
    lua_pop(L, 1);
    decode_value(d);
    lua_rawseti(L, dst, pos + k - 1);
  }
  d->depth--;
}

/* What loads_into does, on bytes anywhere (a Lua string, or a record in a Pool ring): the
 * table at index dst gets the items; the value (at > 0) or nothing is pushed. Raises. */
static int loads_into_bytes(lua_State *L, const char *s, size_t len, int dst, lua_Integer pos,
                            lua_Integer n, lua_Integer at) {
  if (n < 0 || pos < 1 || pos > LUA_MAXINTEGER - n || at < 0)
    luamp_raise(L, "Value", "loads_into: bad position or count");
  lua_pushnil(L);                                   /* refs_slot */
  dec d;
  dec_init(&d, L, s, len, 0);
  d.refs_slot = lua_gettop(L);
  if (d.p == d.end) dec_fail(&d, "empty input");
  if (*d.p != CODEC_VERSION) dec_fail(&d, "unsupported format version %d", *d.p);
  d.p++;
  need(&d, 1);
  if (at == 0) {
    if (*d.p != T_TABLE) dec_fail(&d, "expected a plain table of %lld items", (long long)n);
    d.p++;
    decode_items_into(&d, dst, pos, n);
    if (d.p != d.end) dec_fail(&d, "%zu trailing bytes", (size_t)(d.end - d.p));
    return 0;
  }
  if (*d.p != T_TABLE) {
    decode_root_rest(&d);
    return 1;
  }
  d.p++;
  size_t narr = get_count(&d, 1);
  size_t nhash = get_count(&d, 2);
  dec_enter(&d);
  lua_createtable(L, (int)prealloc(&d, narr, 1), (int)prealloc(&d, nhash, 2));
  int t = lua_gettop(L);
  dec_register(&d, t);
  for (size_t i = 1; i <= narr; i++) {
    if ((lua_Integer)i == at && d.p < d.end && *d.p == T_TABLE) {
      int ok = lua_rawgeti(L, t, 3) == LUA_TBOOLEAN && lua_toboolean(L, -1);
      lua_pop(L, 1);
      if (ok) {
        d.p++;
        decode_items_into(&d, dst, pos, n);
        lua_pushboolean(L, 1);
        lua_rawseti(L, t, (lua_Integer)i);
        continue;
      }
    }
    decode_value(&d);
    lua_rawseti(L, t, (lua_Integer)i);
  }
  for (size_t i = 0; i < nhash; i++) {
    decode_value(&d);
    int kt = lua_type(L, -1);
    if (kt == LUA_TNIL || (kt == LUA_TNUMBER && !lua_isinteger(L, -1) && isnan(lua_tonumber(L, -1))))
      dec_fail(&d, "invalid table key");
    decode_value(&d);
    lua_rawset(L, t);
  }
  d.depth--;
  if (d.p != d.end) dec_fail(&d, "%zu trailing bytes", (size_t)(d.end - d.p));
  return 1;
}

/* _core.loads_into(s, dst, pos, n, [at]): decodes s (trusted) without making the big
 * table a Pool result carries (a million results would otherwise be decoded into a
 * fresh table, its pages faulted in, and moved):
 *  - without at: s is a table whose keys are the integers 1..n and nothing else (a
 *    chunk's results); its items go straight into dst[pos .. pos+n-1]. Returns nothing.
 *  - with at: s is a result message, a list whose item 3 says whether the chunk succeeded;
 *    it is decoded and returned as usual, except that when item 3 is true and item `at` is
 *    such a table of n items, those go straight into dst and item `at` becomes true.
 * dst[pos .. pos+n-1] are all replaced (holes become nil), other keys of dst are left as
 * they are. Raises Serialize for anything else. */
static int l_loads_into(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Integer pos = luaL_checkinteger(L, 3), n = luaL_checkinteger(L, 4);
  lua_Integer at = luaL_optinteger(L, 5, 0);
  lua_settop(L, 5);
  return loads_into_bytes(L, s, len, 2, pos, n, at);
}

typedef struct into_args {
  const char *s;
  size_t len;
  lua_Integer pos, n, at;
  int nres;
} into_args;

/* lua_pcall'd: (into_args*, dst). */
static int loads_into_protected(lua_State *L) {
  into_args *a = lua_touserdata(L, 1);
  a->nres = loads_into_bytes(L, a->s, a->len, 2, a->pos, a->n, a->at);
  return a->nres;
}

int luamp_decode_into(lua_State *L, const char *data, size_t len, int dst, lua_Integer pos,
                      lua_Integer n, lua_Integer at) {
  if (!lua_checkstack(L, 8)) {
    luamp_error_push(L, "Serialize", "Lua stack exhausted");
    return -1;
  }
  dst = lua_absindex(L, dst);
  into_args a = {data, len, pos, n, at, 0};
  lua_pushcfunction(L, loads_into_protected);
  lua_pushlightuserdata(L, &a);
  lua_pushvalue(L, dst);
  if (lua_pcall(L, 2, LUA_MULTRET, 0) == LUA_OK) return a.nres;
  normalize_error(L);
  return -1;
}

/* _core.loadx(bytes, fds|nil) -> v: decodes (trusted) with the bundle's descriptors; the
 * bundle is used up (every descriptor left is closed), whatever the outcome. */
static int l_loadx(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  luamp_fdlist *l = luamp_fds_check_bundle(L, 2);
  int rc = luamp_decode_fds(L, s, len, 0, l);
  if (l) luamp_fdlist_close(l);
  if (rc < 0) return lua_error(L);
  return 1;
}

/* _core.register_handle(type_name, rebuild) */
static int l_register_handle(lua_State *L) {
  luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUAMP_HANDLES_KEY);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_rawset(L, -3);
  return 0;
}

int luamp_open_codec(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"dumps", l_dumps},
    {"loads", l_loads},
    {"loads_trusted", l_loads_trusted},
    {"loads_into", l_loads_into},
    {"loadx", l_loadx},
    {"register_handle", l_register_handle},
    {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  lua_pushboolean(L, 1);
  lua_pushcclosure(L, l_dumps, 1);
  lua_setfield(L, -2, "dumpx");
  return 0;
}

lua_Integer luamp_handle_field(lua_State *L, int t, const char *what, const char *k) {
  lua_getfield(L, t, k);
  int ok;
  lua_Integer v = lua_tointegerx(L, -1, &ok);
  lua_pop(L, 1);
  if (!ok) luamp_raise(L, "Value", "%s: bad field '%s'", what, k);
  return v;
}
