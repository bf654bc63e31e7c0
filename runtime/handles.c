/*
 * handles.c — how a luamp object reaches a process that did not inherit it: the file
 * descriptors that travel with a message, and the per-process registry that makes a
 * handle decoded where its object already lives the same Lua object.
 *
 * Design.
 *
 * A handle (codec.c, T_HANDLE) is a type name plus a payload. Every luamp object is
 * backed by file descriptors: a Queue by a memfd, two or three eventfds and a side
 * socket, a Connection by a socket, the Lock family, Value and Array by blocks of the
 * shared arena (one memfd per process tree), SharedMemory by a name in /dev/shm. A
 * process can only use the object if it holds those descriptors, so the descriptors
 * travel with the message that carries the handle, whatever the path:
 *
 *  - Over a Connection (Pipe, Pool tasks and results): SCM_RIGHTS on the first record
 *    of the frame; the frame header says how many descriptors belong to the message
 *    (connection.c), so records drained into a buffer while a send waited keep theirs.
 *  - Inside a Queue item (shared memory cannot hold a descriptor): every queue has a
 *    side socket, an AF_UNIX datagram socket connected to itself that every holder of
 *    the queue has. A put whose item carries descriptors sends them on it, with a token,
 *    under the queue's lock, and commits the item with the same token; a get pops the
 *    item and receives its descriptors under the same lock, so the socket's order is the
 *    queue's order (queue.c). Descriptors of an item that is never taken are freed by the
 *    kernel with the socket, when the last process holding the queue lets it go: no
 *    process has to stay alive to serve them, and nothing leaks.
 *  - luamp.dumps (no transport): the payload names the sender's descriptor numbers, and
 *    only a process that inherited them (a forked child) can rebuild the object, after
 *    checking their identity. Internal paths never use this.
 *
 * Why not pidfd_getfd or /proc/PID/fd. pidfd_getfd needs PTRACE_MODE_ATTACH on the
 * sender: under Yama ptrace_scope=1 (the default on most distributions) that only holds
 * for the sender's ancestors, so a Pool worker could never fetch from its parent, and two
 * unrelated processes of the same user never. Opening /proc/PID/fd/N needs only
 * PTRACE_MODE_READ (not restricted by Yama), but it reopens the file by path: it works
 * for a memfd, and fails with ENXIO for eventfds and sockets, which queues and
 * connections are made of; and the sender must still be alive and still hold the fd when
 * the receiver asks. A broker process would need its own lifetime management and a
 * round trip per handle. SCM_RIGHTS needs no privilege, works between any two
 * processes that share a socket, and the kernel keeps in-flight descriptors alive and
 * garbage-collects them (cycles included) with their socket.
 *
 * Lifetime. Descriptor-backed objects (queues, connections) are freed by the kernel when
 * the last descriptor goes, in whatever process, including processes that crash. Arena
 * blocks are reference counted in shared memory (arena.c): a message carrying a handle
 * holds one "in flight" reference, which the receiver adopts, so the sender may drop its
 * own right after sending; the block is freed when the last holder lets go. A process
 * killed by a signal still leaks the arena blocks it held (nobody is left to count them
 * down) until the arena itself goes with the last process of the tree; its descriptors
 * are released by the kernel.
 *
 * Identity. Rebuilding consults a weak table keyed by what makes the object itself (the
 * memfd's device and inode, the socket's inode, the arena block and its generation), so a
 * handle decoded in a process that already has the object gives back that Lua object
 * (and the descriptors that came with it are closed).
 *
 * Bad input. A descriptor index that does not name a descriptor of the message, a
 * descriptor of the wrong kind, an object that no longer exists: the rebuild raises
 * Value naming the object kind, the message's remaining descriptors are closed, and the
 * transport stays usable.
 *
 * This file owns the carrier lists (luamp_fdlist) installed while a message is encoded
 * or decoded, the identity registry, and the Lua-side descriptor bundle (luamp.fds) that
 * lets the Pool carry descriptors with bytes it encoded earlier (_core.dumpx/loadx,
 * which are the codec's: the codec calls this file, never the other way round).
 */
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define FDS_MT "luamp.fds"
#define IDENTITY_KEY "luamp.handle_identity"

static _Thread_local luamp_fdlist *send_list;
static _Thread_local luamp_fdlist *recv_list;

luamp_fdlist *luamp_fds_send_begin(luamp_fdlist *l) {
  luamp_fdlist *prev = send_list;
  if (l) l->n = 0;
  send_list = l;
  return prev;
}

void luamp_fds_send_end(luamp_fdlist *prev) { send_list = prev; }

luamp_fdlist *luamp_fds_recv_begin(luamp_fdlist *l) {
  luamp_fdlist *prev = recv_list;
  recv_list = l;
  return prev;
}

void luamp_fds_recv_end(luamp_fdlist *prev) { recv_list = prev; }

int luamp_handle_send_fd(lua_State *L, int fd) {
  luamp_fdlist *l = send_list;
  if (!l) return -1;
  for (int i = 0; i < l->n; i++)
    if (l->fd[i] == fd) return i;
  if (l->n >= LUAMP_MAX_FDS)
    luamp_raise(L, "Serialize", "a message can carry at most %d descriptors (too many luamp "
                "objects in one message)", LUAMP_MAX_FDS);
  l->fd[l->n] = fd;
  return l->n++;
}

int luamp_handle_recv_fd(lua_State *L, int payload, const char *field, const char *kind) {
  lua_getfield(L, payload, field);
  int ok;
  lua_Integer i = lua_tointegerx(L, -1, &ok);
  lua_pop(L, 1);
  luamp_fdlist *l = recv_list;
  if (!ok || !l || i < 0 || i >= l->n || l->fd[i] < 0)
    luamp_raise(L, "Value", "cannot receive a %s: its descriptor (%s) did not arrive with the "
                "message", kind, field);
  int fd = l->fd[i];
  l->fd[i] = -1;
  return fd;
}

int luamp_handle_is_carried(lua_State *L, int payload) {
  lua_getfield(L, payload, "carried");
  int c = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return c;
}

void luamp_fdlist_close(luamp_fdlist *l) {
  for (int i = 0; i < l->n; i++) {
    if (l->fd[i] >= 0) luamp_close_fd(l->fd[i]);
    l->fd[i] = -1;
  }
  l->n = 0;
}

/* ---- identity registry ------------------------------------------------------------------ */

static void push_identity(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, IDENTITY_KEY) == LUA_TTABLE) return;
  lua_pop(L, 1);
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "v");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, IDENTITY_KEY);
}

int luamp_handle_find(lua_State *L, const char *key) {
  push_identity(L);
  if (lua_getfield(L, -1, key) == LUA_TNIL) {
    lua_pop(L, 2);
    return 0;
  }
  lua_remove(L, -2);
  return 1;
}

void luamp_handle_remember(lua_State *L, int idx, const char *key) {
  idx = lua_absindex(L, idx);
  push_identity(L);
  lua_pushvalue(L, idx);
  lua_setfield(L, -2, key);
  lua_pop(L, 1);
}

/* ---- descriptor bundles for Lua (the Pool's encoded-ahead chunks) ----------------------- */

typedef struct bundle { luamp_fdlist l; } bundle;

static int bundle_close(lua_State *L) {
  bundle *b = luaL_checkudata(L, 1, FDS_MT);
  luamp_fdlist_close(&b->l);
  return 0;
}

luamp_fdlist *luamp_fds_push_bundle(lua_State *L) {
  bundle *b = lua_newuserdatauv(L, sizeof *b, 0);
  b->l.n = 0;
  luaL_setmetatable(L, FDS_MT);
  return &b->l;
}

luamp_fdlist *luamp_fds_check_bundle(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return NULL;
  return &((bundle *)luaL_checkudata(L, idx, FDS_MT))->l;
}

/* _core.fds_count(fds) -> descriptors still held (tests) */
static int l_fds_count(lua_State *L) {
  luamp_fdlist *l = luamp_fds_check_bundle(L, 1);
  int n = 0;
  for (int i = 0; l && i < l->n; i++) n += l->fd[i] >= 0;
  lua_pushinteger(L, n);
  return 1;
}

int luamp_open_handles(lua_State *L) {
  if (luaL_newmetatable(L, FDS_MT)) {
    lua_pushcfunction(L, bundle_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, bundle_close);
    lua_setfield(L, -2, "__close");
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, bundle_close);
    lua_setfield(L, -2, "close");
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  static const luaL_Reg fns[] = {
    {"fds_count", l_fds_count},
    {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return 0;
}
