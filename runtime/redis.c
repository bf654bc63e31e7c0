/*
 * redis.c — a Redis connection for the broker (hiredis), and the broker's message seal
 * (libsodium).
 *
 * Connection: hiredis does the protocol only. The socket is non-blocking and every wait
 * for it goes through luamp_wait_fds, so Ctrl-C gives Interrupted, timeouts hold and
 * background pumps keep running; no libuv loop is involved (hiredis's libuv adapter
 * would need a loop run re-entrantly). A call sends a whole pipeline (N commands) and
 * reads N replies. A pipeline cut short (timeout, Ctrl-C, I/O error) leaves replies in
 * flight that nobody would match to their commands, so the connection is closed then;
 * the Lua layer (lua/luamp/broker.lua) reconnects.
 *
 * The server is untrusted: hiredis's reader accumulates bulk strings only as their bytes
 * arrive (a claimed length allocates nothing), nests at most 7 levels, and our reply
 * functions refuse arrays longer than MAX_ELEMENTS before hiredis allocates them. Reply
 * trees are converted to Lua with checked stack room; the tree being converted is held by
 * the connection object, so an out-of-memory error in the middle frees it later (__gc or
 * the next call) instead of leaking.
 *
 * Seal: a message is MAC(32 bytes) || codec bytes. The MAC is crypto_auth
 * (HMAC-SHA-512-256) under a key derived from the authkey with crypto_generichash. Only
 * after the MAC verifies are the bytes decoded, with the trusted decoder (they may carry
 * bytecode); a message that fails is never decoded at all.
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <hiredis/hiredis.h>
#include <sodium.h>

#include "internal.h"

#define CONN_MT "luamp.redis"
#define SEALBUF_MT "luamp.sealbuf"
#define MAX_ELEMENTS (1 << 20)     /* array replies longer than this are refused */
#define MAX_COMMANDS (1 << 20)     /* commands in one pipeline */
#define MAX_ARGS (1 << 20)         /* arguments of one command */
#define MAX_DEPTH 8

typedef struct conn {
  redisContext *ctx;      /* NULL once closed */
  redisReply *held;       /* reply tree being converted (freed at the next call or __gc) */
  lua_Integer unread;     /* replies of conn:send commands, read (and dropped) later */
  char deferred[128];     /* the first error among those, "" if none */
} conn;

/* ---- reply functions that refuse huge arrays -------------------------------------------- */

static redisReplyObjectFunctions checked_fns;
static void *(*default_create_array)(const redisReadTask *, int);

static void *checked_create_array(const redisReadTask *task, int elements) {
  if (elements < 0 || elements > MAX_ELEMENTS) return NULL;   /* reader reports an error */
  return default_create_array(task, elements);
}

static void use_checked_fns(redisContext *c) {
  if (!default_create_array) {
    checked_fns = *c->reader->fn;
    default_create_array = checked_fns.createArray;
    checked_fns.createArray = checked_create_array;
  }
  c->reader->fn = &checked_fns;
}

/* ---- connection ------------------------------------------------------------------------- */

static conn *check_conn(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, CONN_MT);
}

static void conn_drop(conn *c) {
  c->unread = 0;
  if (c->held) { freeReplyObject(c->held); c->held = NULL; }
  if (c->ctx) { redisFree(c->ctx); c->ctx = NULL; }
}

static int conn_gc(lua_State *L) {
  conn_drop(check_conn(L, 1));
  return 0;
}

static void raise_wait(lua_State *L, conn *c, int rc, const char *what) {
  conn_drop(c);
  if (rc == -2) {
    luamp_take_interrupt();
    luamp_raise(L, "Interrupted", "interrupted");
  }
  if (rc == 0) luamp_raise(L, "Timeout", "redis: no %s before the timeout", what);
  luamp_raise_errno(L, "BrokenPipe", "redis: wait", errno);
}

/* redis_connect(host, port, [timeout]) -> conn. Raises BrokenPipe when the server cannot
 * be reached, Timeout when the connect takes longer than timeout. */
static int l_connect(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  lua_Integer port = luaL_checkinteger(L, 2);
  double deadline = luamp_deadline_arg(L, 3);
  if (port < 1 || port > 65535) luamp_raise(L, "Value", "redis: bad port %lld", (long long)port);
  conn *c = lua_newuserdatauv(L, sizeof *c, 0);
  c->ctx = NULL;
  c->held = NULL;
  c->unread = 0;
  c->deferred[0] = '\0';
  luaL_setmetatable(L, CONN_MT);
  c->ctx = redisConnectNonBlock(host, (int)port);
  if (!c->ctx) luamp_raise(L, "Value", "redis: out of memory");
  if (c->ctx->err) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s", c->ctx->errstr);
    conn_drop(c);
    luamp_raise(L, "BrokenPipe", "cannot connect: %s", msg);
  }
  (void)fcntl(c->ctx->fd, F_SETFD, FD_CLOEXEC);
  struct pollfd p = {.fd = c->ctx->fd, .events = POLLOUT};
  int rc = luamp_wait_fds(&p, 1, deadline);
  if (rc <= 0) raise_wait(L, c, rc, "connection");
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(c->ctx->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
  if (err) {
    conn_drop(c);
    luamp_raise(L, "BrokenPipe", "cannot connect: %s", strerror(err));
  }
  use_checked_fns(c->ctx);
  return 1;
}

/* Pushes reply r as a Lua value: string (bulk or status), integer, false (nil), array
 * table, or {redis_error = "message"} for an error reply. */
static void push_reply(lua_State *L, const redisReply *r, int depth) {
  luaL_checkstack(L, 4, "redis reply");
  switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
      lua_pushlstring(L, r->str, r->len);
      break;
    case REDIS_REPLY_INTEGER:
      lua_pushinteger(L, r->integer);
      break;
    case REDIS_REPLY_NIL:
      lua_pushboolean(L, 0);
      break;
    case REDIS_REPLY_ERROR:
      lua_createtable(L, 0, 1);
      lua_pushlstring(L, r->str, r->len);
      lua_setfield(L, -2, "redis_error");
      break;
    case REDIS_REPLY_ARRAY:
      if (depth >= MAX_DEPTH) luamp_raise(L, "Value", "redis: reply nested too deeply");
      lua_createtable(L, r->elements > INT_MAX ? 0 : (int)r->elements, 0);
      for (size_t i = 0; i < r->elements; i++) {
        push_reply(L, r->element[i], depth + 1);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
      }
      break;
    default:
      luamp_raise(L, "Value", "redis: reply of unknown type %d", r->type);
  }
}

/* Checks that the value at idx is a command: a non-empty table of strings/numbers. */
static lua_Integer check_command(lua_State *L, int idx, lua_Integer which) {
  if (lua_type(L, idx) != LUA_TTABLE) luamp_raise(L, "Value", "redis: command %lld is not a table", (long long)which);
  lua_Integer n = luaL_len(L, idx);
  if (n < 1 || n > MAX_ARGS) luamp_raise(L, "Value", "redis: command %lld has %lld arguments", (long long)which, (long long)n);
  for (lua_Integer i = 1; i <= n; i++) {
    int t = lua_geti(L, idx, i);
    lua_pop(L, 1);
    if (t != LUA_TSTRING && t != LUA_TNUMBER)
      luamp_raise(L, "Value", "redis: argument %lld of command %lld is a %s", (long long)i, (long long)which, lua_typename(L, t));
  }
  return n;
}

/* Appends the (checked) command at idx to the context's output; 0 ok, -1 out of memory. */
static int append_command(lua_State *L, conn *c, int idx, lua_Integer n) {
  const char **argv = lua_newuserdatauv(L, sizeof *argv * (size_t)n, 0);
  size_t *lens = lua_newuserdatauv(L, sizeof *lens * (size_t)n, 0);
  lua_newtable(L);          /* anchors the strings made from numbers */
  int anchor = lua_gettop(L);
  for (lua_Integer i = 1; i <= n; i++) {
    int t = lua_geti(L, idx, i);
    argv[i - 1] = lua_tolstring(L, -1, &lens[i - 1]);
    if (t == LUA_TSTRING) lua_pop(L, 1);          /* the table keeps it */
    else lua_rawseti(L, anchor, i);
  }
  int rc = redisAppendCommandArgv(c->ctx, (int)n, argv, lens) == REDIS_OK ? 0 : -1;
  lua_pop(L, 3);
  return rc;
}

/* Checks then appends every command of the table at idx; returns how many. */
static lua_Integer append_all(lua_State *L, conn *c, int idx) {
  if (!c->ctx) luamp_raise(L, "BrokenPipe", "redis: connection closed");
  lua_Integer n = luaL_len(L, idx);
  if (n < 1 || n > MAX_COMMANDS) luamp_raise(L, "Value", "redis: pipeline of %lld commands", (long long)n);
  /* everything is checked before anything is appended: a half-appended pipeline would
   * leave commands whose replies nobody reads */
  for (lua_Integer i = 1; i <= n; i++) {
    lua_geti(L, idx, i);
    check_command(L, lua_gettop(L), i);
    lua_pop(L, 1);
  }
  for (lua_Integer i = 1; i <= n; i++) {
    lua_geti(L, idx, i);
    int top = lua_gettop(L);
    if (append_command(L, c, top, luaL_len(L, top)) < 0) {
      conn_drop(c);
      luamp_raise(L, "Value", "redis: out of memory");
    }
    lua_pop(L, 1);
  }
  return n;
}

static void raise_lost(lua_State *L, conn *c) {
  char msg[128];
  snprintf(msg, sizeof msg, "%s", c->ctx && c->ctx->errstr[0] ? c->ctx->errstr : "protocol error");
  conn_drop(c);
  luamp_raise(L, "BrokenPipe", "redis: connection lost: %s", msg);
}

/* Writes the output buffer out and, while doing so and afterwards, reads `want` replies:
 * the first c->unread of them are dropped (noting an error), the others pushed into the
 * table on top of the stack. */
static void exchange(lua_State *L, conn *c, lua_Integer want, int drain, double deadline) {
  lua_Integer got = 0;
  int written = 0;
  for (;;) {
    if (!written && redisBufferWrite(c->ctx, &written) != REDIS_OK) raise_lost(L, c);
    int reading = got < want || (drain && c->unread > 0);
    if (reading) {
      void *reply = NULL;
      if (redisGetReplyFromReader(c->ctx, &reply) != REDIS_OK) raise_lost(L, c);
      if (reply) {
        c->held = reply;
        if (c->unread > 0) {
          c->unread--;
          if (c->held->type == REDIS_REPLY_ERROR && !c->deferred[0])
            snprintf(c->deferred, sizeof c->deferred, "%s", c->held->str);
        } else {
          push_reply(L, c->held, 0);
          lua_rawseti(L, -2, ++got);
        }
        freeReplyObject(c->held);
        c->held = NULL;
        continue;
      }
    }
    if (written && !reading) break;
    struct pollfd p = {.fd = c->ctx->fd, .events = (reading || !written ? POLLIN : 0) | (written ? 0 : POLLOUT)};
    int rc = luamp_wait_fds(&p, 1, deadline);
    if (rc <= 0) raise_wait(L, c, rc, reading ? "reply" : "write");
    /* reading while writing too: a server blocked on its own output would never read */
    if ((p.revents & (POLLIN | POLLHUP | POLLERR)) && redisBufferRead(c->ctx) != REDIS_OK) raise_lost(L, c);
  }
}

/* conn:pipeline({{"SET", "k", "v"}, {"GET", "k"}, ...}, [timeout]) -> {reply, ...}
 * Sends every command, then reads one reply per command (after those of earlier sends). */
static int l_pipeline(lua_State *L) {
  conn *c = check_conn(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  double deadline = luamp_deadline_arg(L, 3);
  lua_settop(L, 3);
  if (c->held) { freeReplyObject(c->held); c->held = NULL; }
  lua_Integer n = append_all(L, c, 2);
  lua_createtable(L, (int)n, 0);
  exchange(L, c, n, 1, deadline);
  return 1;
}

/* conn:send(cmds, [timeout]): sends without waiting for the replies, which a later
 * pipeline reads and drops; conn:deferred_error() gives the first error among them. */
static int l_send(lua_State *L) {
  conn *c = check_conn(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  double deadline = luamp_deadline_arg(L, 3);
  lua_settop(L, 3);
  if (c->held) { freeReplyObject(c->held); c->held = NULL; }
  lua_Integer n = append_all(L, c, 2);
  lua_createtable(L, 0, 0);
  exchange(L, c, 0, 0, deadline);
  c->unread += n;
  return 0;
}

static int l_deferred_error(lua_State *L) {
  conn *c = check_conn(L, 1);
  if (!c->deferred[0]) return 0;
  lua_pushstring(L, c->deferred);
  c->deferred[0] = '\0';
  return 1;
}

static int l_conn_close(lua_State *L) {
  conn_drop(check_conn(L, 1));
  return 0;
}

static int l_conn_closed(lua_State *L) {
  lua_pushboolean(L, check_conn(L, 1)->ctx == NULL);
  return 1;
}

/* ---- seal ------------------------------------------------------------------------------- */

#define KEY_CONTEXT "luamp.broker.mac.v1"

/* broker_key(authkey) -> 32-byte MAC key */
static int l_broker_key(lua_State *L) {
  size_t len;
  const char *authkey = luaL_checklstring(L, 1, &len);
  unsigned char key[crypto_auth_KEYBYTES];
  crypto_generichash(key, sizeof key, (const unsigned char *)authkey, len,
                     (const unsigned char *)KEY_CONTEXT, sizeof KEY_CONTEXT - 1);
  lua_pushlstring(L, (const char *)key, sizeof key);
  sodium_memzero(key, sizeof key);
  return 1;
}

static const unsigned char *check_key(lua_State *L, int idx) {
  size_t len;
  const char *k = luaL_checklstring(L, idx, &len);
  if (len != crypto_auth_KEYBYTES) luamp_raise(L, "Value", "broker: bad key");
  return (const unsigned char *)k;
}

static int sealbuf_gc(lua_State *L) {
  luamp_buf_free(luaL_checkudata(L, 1, SEALBUF_MT));
  return 0;
}

/* broker_seal(key, value) -> MAC || codec bytes of value. Raises Serialize. */
static int l_broker_seal(lua_State *L) {
  const unsigned char *key = check_key(L, 1);
  luaL_checkany(L, 2);
  lua_settop(L, 2);
  luamp_buf *b = lua_newuserdatauv(L, sizeof *b, 0);     /* slot 3: owns the bytes */
  luamp_buf_init(b);
  luaL_setmetatable(L, SEALBUF_MT);
  if (luamp_buf_reserve(b, crypto_auth_BYTES) < 0) luamp_raise(L, "Value", "out of memory");
  b->len = crypto_auth_BYTES;
  if (luamp_encode(L, 2, b) < 0) lua_error(L);            /* b freed by its __gc */
  crypto_auth((unsigned char *)b->data, (const unsigned char *)b->data + crypto_auth_BYTES,
              b->len - crypto_auth_BYTES, key);
  lua_pushlstring(L, b->data, b->len);
  luamp_buf_free(b);
  return 1;
}

/* broker_open(key, msg) -> true, value | false, reason. The bytes are decoded (trusted)
 * only once the MAC verifies. */
static int l_broker_open(lua_State *L) {
  const unsigned char *key = check_key(L, 1);
  size_t len;
  const char *msg = luaL_checklstring(L, 2, &len);
  if (len <= crypto_auth_BYTES ||
      crypto_auth_verify((const unsigned char *)msg, (const unsigned char *)msg + crypto_auth_BYTES,
                         len - crypto_auth_BYTES, key) != 0) {
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "bad signature");
    return 2;
  }
  lua_pushboolean(L, 1);
  if (luamp_decode(L, msg + crypto_auth_BYTES, len - crypto_auth_BYTES) < 0) {
    lua_pushboolean(L, 0);
    lua_replace(L, -3);
  }
  return 2;
}

/* broker_random_id() -> 32 hex digits */
static int l_broker_random_id(lua_State *L) {
  unsigned char r[16];
  char hex[33];
  randombytes_buf(r, sizeof r);
  sodium_bin2hex(hex, sizeof hex, r, sizeof r);
  lua_pushstring(L, hex);
  return 1;
}

/* ---- worker signals ----------------------------------------------------------------------
 * `luamp worker` stops on SIGTERM or SIGINT by finishing its current task: the handler
 * marks a stop (read between tasks) and, unless a task is running, an interrupt (so a
 * wait on Redis returns at once). A second signal interrupts a running task too. */

static volatile sig_atomic_t stop_requested;
static volatile sig_atomic_t in_task;

static void on_stop_signal(int sig) {
  (void)sig;
  if (stop_requested < 2) stop_requested++;
  if (in_task == 0 || (in_task == 1 && stop_requested >= 2)) luamp_request_interrupt();
}

/* broker_in_task(mode): 0 idle (a stop signal interrupts the wait), 1 running a task (the
 * first signal lets it finish, the second interrupts it), 2 sending the last results and
 * handing tasks back (no signal interrupts; the parent kills on a third). */
static int l_broker_in_task(lua_State *L) {
  lua_Integer mode = luaL_checkinteger(L, 1);
  in_task = mode == 1 ? 1 : mode == 2 ? 2 : 0;
  return 0;
}

/* broker_clear_interrupt(): drops a pending interrupt mark (a stopping worker still sends
 * its results and hands back its tasks). */
static int l_broker_clear_interrupt(lua_State *L) {
  (void)L;
  luamp_take_interrupt();
  return 0;
}

/* broker_trap_stop([child]): installs the handler for SIGTERM, and for SIGINT unless
 * `child` (a worker's processes stop when their parent tells them, with SIGTERM: a
 * Ctrl-C at the terminal reaches the whole process group, and must count once). */
static int l_broker_trap_stop(lua_State *L) {
  int child = lua_toboolean(L, 1);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  struct sigaction ign;
  memset(&ign, 0, sizeof ign);
  ign.sa_handler = SIG_IGN;
  sigemptyset(&ign.sa_mask);
  if (sigaction(SIGTERM, &sa, NULL) < 0 || sigaction(SIGINT, child ? &ign : &sa, NULL) < 0)
    luamp_raise_errno(L, "Value", "sigaction", errno);
  stop_requested = 0;
  in_task = 0;
  return 0;
}

/* broker_stop_requested() -> boolean, signals seen (1 or 2, 2 meaning "at least 2") */
static int l_broker_stop_requested(lua_State *L) {
  lua_pushboolean(L, stop_requested != 0);
  lua_pushinteger(L, stop_requested);
  return 2;
}

int luamp_open_redis(lua_State *L) {
  if (sodium_init() < 0) luamp_raise(L, "Value", "libsodium failed to initialise");
  static const luaL_Reg conn_methods[] = {
    {"pipeline", l_pipeline},
    {"send", l_send},
    {"deferred_error", l_deferred_error},
    {"close", l_conn_close},
    {"closed", l_conn_closed},
    {NULL, NULL}
  };
  if (luaL_newmetatable(L, CONN_MT)) {
    luaL_newlib(L, conn_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, conn_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, SEALBUF_MT)) {
    lua_pushcfunction(L, sealbuf_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  static const luaL_Reg fns[] = {
    {"redis_connect", l_connect},
    {"broker_key", l_broker_key},
    {"broker_seal", l_broker_seal},
    {"broker_open", l_broker_open},
    {"broker_random_id", l_broker_random_id},
    {"broker_trap_stop", l_broker_trap_stop},
    {"broker_stop_requested", l_broker_stop_requested},
    {"broker_in_task", l_broker_in_task},
    {"broker_clear_interrupt", l_broker_clear_interrupt},
    {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return 0;
}
