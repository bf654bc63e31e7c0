/*
 * alloc.c — a cache of freed 1-4 KiB blocks in front of a Lua state's allocator.
 *
 * Why. glibc's malloc keeps freed blocks of up to 1032 bytes in a per-thread cache
 * (tcache) that hands them back in a few instructions; anything larger goes through the
 * bins, with coalescing and unsorted-list sorting on every malloc and free. A Lua string
 * of 1 KiB is a 1049-byte block (24 bytes of header, the bytes, a zero), just past that
 * line, and a process that takes 1 KiB items off a Queue makes one per item and frees it
 * a little later (the garbage collector): callgrind put malloc and free at ~550
 * instructions per such string, more than the rest of a get together.
 *
 * What. luamp_alloc_cache_on(L) puts a layer over the state's allocator that keeps
 * freed blocks of (1024, 4096] bytes on LIFO lists, one per 64-byte size class, up to
 * CACHE_BYTES in all, and hands them out again for any size of their class; a new block
 * of such a size is asked of the allocator underneath at its class's full size. Every
 * other call goes through untouched. A block is only kept, or grown in place, when the
 * allocator underneath says it really is that large (malloc_usable_size), so blocks
 * allocated before the layer went on (at their exact size) are never mistaken for a
 * class's size; the layer must therefore sit over malloc (luaL_newstate's allocator, or
 * the Pool's big-block layer over it, which passes these sizes to malloc).
 *
 * Lifetime. The cache is process-private memory: a forked child has its own copy, as it
 * has its own heap. lua_close frees the main thread's block last; on that call the layer
 * gives its lists back and frees itself. It is put on by the luamp program (host/main.c)
 * when it makes a state: code that is part of the program, so never unloaded before
 * that last call.
 */
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define CACHE_LO 1024u            /* blocks above this (tcache keeps requests <= 1032) */
#define CACHE_HI 4096u            /* ... up to this */
#define CLASS_SHIFT 6             /* 64-byte classes */
#define NCLASS ((CACHE_HI - CACHE_LO) >> CLASS_SHIFT)
#define CACHE_BYTES (512u << 10)  /* most bytes kept on the lists */

typedef struct cache {
  lua_Alloc f;                    /* the allocator underneath */
  void *ud;
  void *last;                     /* the main thread's block: lua_close frees it last */
  size_t bytes;                   /* bytes on the lists */
  void *head[NCLASS];             /* freed blocks, each holding the next one's address */
} cache;

static int in_range(size_t n) { return n > CACHE_LO && n <= CACHE_HI; }
static unsigned class_of(size_t n) { return (unsigned)((n - CACHE_LO - 1) >> CLASS_SHIFT); }
static size_t class_size(unsigned k) { return CACHE_LO + ((size_t)(k + 1) << CLASS_SHIFT); }

/* Whether ptr, a block Lua knows as osize bytes, really has its class's full size. */
static int full_size(void *ptr, size_t osize) {
  return in_range(osize) && malloc_usable_size(ptr) >= class_size(class_of(osize));
}

static void cache_drop(cache *c) {
  for (unsigned k = 0; k < NCLASS; k++) {
    while (c->head[k]) {
      void *p = c->head[k];
      memcpy(&c->head[k], p, sizeof(void *));
      c->f(c->ud, p, class_size(k), 0);
    }
  }
  c->bytes = 0;
}

static void *cache_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  cache *c = ud;
  if (!ptr) {                                   /* (osize is then a type tag) */
    if (!in_range(nsize)) return c->f(c->ud, NULL, osize, nsize);
    unsigned k = class_of(nsize);
    void *p = c->head[k];
    if (p) {
      memcpy(&c->head[k], p, sizeof(void *));
      c->bytes -= class_size(k);
      return p;
    }
    return c->f(c->ud, NULL, osize, class_size(k));
  }
  if (nsize == 0) {
    if (ptr == c->last) {                       /* lua_close's last call: so are we */
      lua_Alloc f = c->f;
      void *fud = c->ud;
      cache_drop(c);
      free(c);
      return f(fud, ptr, osize, 0);
    }
    if (full_size(ptr, osize) && c->bytes + class_size(class_of(osize)) <= CACHE_BYTES) {
      unsigned k = class_of(osize);
      memcpy(ptr, &c->head[k], sizeof(void *));
      c->head[k] = ptr;
      c->bytes += class_size(k);
      return NULL;
    }
    return c->f(c->ud, ptr, osize, 0);
  }
  if (in_range(nsize)) {
    if (in_range(osize) && class_of(osize) == class_of(nsize) && full_size(ptr, osize))
      return ptr;                               /* it fits where it is */
    /* a block of the new class's full size, so that it can be kept when freed; the old
     * one stays valid if there is none (Lua's contract for a failed reallocation) */
    void *np = cache_alloc(ud, NULL, 0, nsize);
    if (!np) return NULL;
    memcpy(np, ptr, osize < nsize ? osize : nsize);
    cache_alloc(ud, ptr, osize, 0);
    return np;
  }
  return c->f(c->ud, ptr, osize, nsize);
}

/* Puts the layer over L's allocator (once; without it if out of memory). */
void luamp_alloc_cache_on(lua_State *L) {
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  if (f == cache_alloc) return;
  cache *c = calloc(1, sizeof *c);
  if (!c) return;
  c->f = f;
  c->ud = ud;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  c->last = lua_getextraspace(lua_tothread(L, -1));
  lua_pop(L, 1);
  lua_setallocf(L, cache_alloc, c);
}
