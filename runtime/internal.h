/*
 * internal.h — what the runtime's C files share with each other and nobody else.
 *
 * Conventions every runtime file follows:
 *  - Each concept file exports `int luamp_open_<concept>(lua_State *L)`, called by
 *    luaopen_luamp with the core table (`luamp._core`, the private C surface that the
 *    Lua modules under lua/ build the public API from) on top of the stack.
 *  - Errors are raised with luamp_raise(), never with a plain string.
 *  - Blocking waits go through luamp_wait_fds(), the runtime's one wait primitive.
 *  - Files depend only downward, in the layers of docs/design.md ("Layers"); the base
 *    layer (base.h) is below all. A file that must act at fork, exec or the end of the
 *    program registers a hook with the base instead of being called by whoever forks.
 *    scripts/check_layers.lua (ctest test_layers) enforces this on the object files.
 */
#ifndef LUAMP_INTERNAL_H
#define LUAMP_INTERNAL_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <lua.h>
#include <lauxlib.h>

#include "luamp.h"
#include "base.h"

/* ---- errors (error.c) ---------------------------------------------------------------
 * A luamp error is a table {kind = "Timeout", message = "..."} with a shared metatable
 * whose __tostring gives "luamp.Timeout: ...". */
#define LUAMP_ERROR_KINDS(X) \
  X(Timeout) X(Empty) X(Full) X(EOF) X(BrokenPipe) X(Closed) X(Value) X(Serialize) \
  X(Remote) X(WorkerLost) X(BrokenBarrier) X(Auth) X(CalledProcess) X(NotFound) \
  X(Interrupted)

/* Pushes a new error object of `kind` (e.g. "Value") with a formatted message. */
void luamp_error_push(lua_State *L, const char *kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Pushes the error object and raises it. Never returns. Call only when the C frame holds
 * no malloc'd memory, fd or lock that would leak. */
int luamp_raise(lua_State *L, const char *kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4), noreturn));
/* Raises an error of `kind` whose message is "<what>: strerror(err)". */
int luamp_raise_errno(lua_State *L, const char *kind, const char *what, int err)
    __attribute__((noreturn));
/* Whether the value at idx is a luamp Interrupted error: a lua_pcall that catches one
 * hands it on as it is (Ctrl-C always wins) rather than reporting it as its own failure. */
int luamp_is_interrupted(lua_State *L, int idx);

/* ---- time and waiting (wait.c) -------------------------------------------------------- */

/* Monotonic seconds. */
double luamp_now(void);
/* Deadline for a Lua timeout argument at idx: nil/none -> -1 (forever), else now+t
 * (a negative t is treated as 0). Raises Value for a non-number. */
double luamp_deadline_arg(lua_State *L, int idx);
/* Waits until one of fds is ready (events as for poll(2)) or the deadline passes
 * (deadline < 0: forever). Retries EINTR with the remaining time; if an interrupt
 * (SIGINT seen by the host) is pending it returns -2. Returns the number of ready fds
 * (revents set), 0 on timeout, -1 with errno on failure. */
int luamp_wait_fds(struct pollfd *fds, int nfds, double deadline);
/* 1 when luamp_wait_fds would only poll the caller's fds (no task scheduler, no pump to
 * serve meanwhile): a caller may then block in its own system call instead, bounded by
 * LUAMP_WAIT_SLICE and ended by EINTR, as luamp_wait_fds is (connection.c's receive). */
int luamp_wait_is_plain(void);
/* In a pollfd's events for luamp_wait_fds: of the tasks waiting on this fd, wake one per
 * readiness (a token fd: each waiter takes one), not all. Never reaches the kernel. */
#define LUAMP_POLL_ONE 0x400
/* Whether a Ctrl-C is pending (the mark stays). */
int luamp_interrupt_pending(void);
/* Longest a wait sleeps in the kernel before it looks for a pending Ctrl-C again (seconds):
 * the bound on how late a Ctrl-C that lands just before a wait's system call is seen. */
#define LUAMP_WAIT_SLICE 0.1
/* The pending-interrupt mark (luamp_request_interrupt, luamp_take_interrupt) is the
 * base's (base.h). */
/* Background pumps (fd + Lua function, registered with _core.pump_add) are serviced by
 * every luamp_wait_fds call; this runs the ready ones once without blocking and returns
 * how many ran. */
int luamp_pump_poll(void);
/* Runs the pump of fd if there is one and fd is readable right now (zero-timeout poll):
 * for a readiness learnt earlier, which a wait may have used up since. 1 if fd was ready. */
int luamp_pump_run_if_ready(int fd);

/* For the scheduler's wait: pump functions running now, pumps registered, appending the
 * idle pump fds not among all[0..nfds) (returns the new count), running the ready ones
 * among all[from..n). */
int luamp_pump_running(void);
int luamp_pump_count(void);
int luamp_pump_fill(struct pollfd *all, int nfds);
void luamp_pump_dispatch(struct pollfd *all, int from, int n);

/* The task scheduler as wait.c sees it (sched.c sets luamp_wait_sched from its opener;
 * it is in wait.c's layer and calls wait.c, so wait.c reaches it only through this):
 * whether tasks live or the caller is one, the wait that stands in for luamp_wait_fds
 * then, and the host loop's readiness of a pump fd that tasks may wait on too. */
typedef struct luamp_wait_scheduler {
  int (*active)(void);
  int (*in_task)(void);
  int (*wait_fds)(struct pollfd *fds, int nfds, double deadline);
  void (*host_fd_ready)(int fd);
} luamp_wait_scheduler;
extern const luamp_wait_scheduler *luamp_wait_sched;

/* ---- tasks (sched.c) -------------------------------------------------------------------
 * luamp_wait_fds and luamp_futex_wait hand over to the scheduler when luamp_sched_active:
 * inside a task the wait suspends only the task; outside, it runs the ready tasks while
 * it waits. Same results as the functions they stand in for. */
int luamp_sched_active(void);
int luamp_sched_in_task(void);
/* Inside a task, and no other task is ready to run: a short spin of its own (waiting for
 * another process) then holds up nothing of this process. */
int luamp_sched_alone(void);
int luamp_sched_futex_wait(_Atomic uint32_t *word, uint32_t expect, double deadline);
/* Turns (sched.c): tasks of this process waiting on the same cross-process wait (key:
 * the address of what they wait on) let one of them wait that way at a time. try takes
 * the turn if it is free (1) or says another task holds it (0); wait suspends the task
 * until it gets the turn (1), the deadline (0) or a cancel (-2); the holder leaves when
 * its wait ends, whatever the outcome. Outside a task: 1, and leave does nothing. */
int luamp_sched_turn_try(const void *key);
int luamp_sched_turn_wait(const void *key, double deadline);
void luamp_sched_turn_leave(const void *key);
/* The same wait without a C stack: when luamp_sched_can_yield(L) (L is the task's own
 * thread and may yield), a C function with nothing to release calls turn_yield as its
 * return; the task yields and k runs when the wait ends (or at once, if it need not
 * wait). k calls turn_resumed for the outcome (as turn_wait's, or 2: an item handed to
 * it, below) and the deadline. */
int luamp_sched_can_yield(lua_State *L);
int luamp_sched_turn_yield(lua_State *L, const void *key, double deadline, lua_KFunction k,
                           lua_KContext ctx);
int luamp_sched_turn_resumed(double *deadline, const char **item, size_t *len);
/* Hand-off: a getter holding key's lock with items left may give them, each of at most
 * LUAMP_HAND_MAX bytes, straight to the tasks given the turn and not run yet (one each,
 * in line order; the turn moves on past them): handable says whether there is one;
 * hand_on calls next for the items (0: no more) while there are. Such a task's
 * turn_resumed then returns 2 with the item's bytes in *item, *len (valid until it next
 * waits). A task handed an item and cancelled before it runs passes the item on to the
 * next such task if there is one (and returns -2), else returns it (the cancel then
 * applies to its next wait): no item handed is lost. */
#define LUAMP_HAND_MAX 48
int luamp_sched_turn_handable(const void *key);
int luamp_sched_turn_hand_on(const void *key, int (*next)(void *arg, const char **data, size_t *len),
                             void *arg);
/* The running task's Lua thread (for the Ctrl-C hook), or NULL. */
lua_State *luamp_sched_current_thread(void);
int luamp_open_sched(lua_State *L);

/* ---- the value codec (codec.c) --------------------------------------------------------
 * A growable byte buffer; the codec appends to it. */
typedef struct luamp_buf {
  char *data;
  size_t len, cap;
} luamp_buf;

void luamp_buf_init(luamp_buf *b);
int luamp_buf_reserve(luamp_buf *b, size_t extra);   /* 0 ok, -1 ENOMEM */
void luamp_buf_free(luamp_buf *b);

/* Encodes the value at idx, appending to b. On failure returns -1 and pushes an error
 * object (Serialize, naming the path to the offending value from `root`, e.g.
 * "args[2].handler: cannot send a coroutine"; root NULL means "value"); b's contents are
 * then unspecified but it is still freeable. Returns 0 on success, pushing nothing.
 * Never raises: Lua errors met on the way (a failing handle hook, out of memory) come
 * back as the error object. */
int luamp_encodex(lua_State *L, int idx, luamp_buf *b, const char *root);
int luamp_encode(lua_State *L, int idx, luamp_buf *b);     /* root "value" */

/* Decodes len bytes; on success pushes the value and returns 0; on malformed input
 * pushes a Serialize error object and returns -1. Never reads past len, never raises.
 * Trusted input (flags 0: between luamp's own processes) may carry Lua bytecode, which
 * Lua does not verify, and live objects of the receiver. Data from anyone else must be
 * decoded with LUAMP_DECODE_UNTRUSTED, which accepts plain data only (nil, booleans,
 * numbers, strings, tables and their metatables):
 *   LUAMP_DECODE_NO_CODE  refuses every function (without loading it) and looks named
 *                         values up only among the modules already loaded (no require);
 *   LUAMP_DECODE_NO_LIVE  refuses the tags that hand out a live object: the global
 *                         table, modules and their fields by name, handles.
 * (NO_CODE alone is for the fuzzer, to reach the named and handle paths safely.) */
#define LUAMP_DECODE_NO_CODE 1
#define LUAMP_DECODE_NO_LIVE 2
#define LUAMP_DECODE_UNTRUSTED (LUAMP_DECODE_NO_CODE | LUAMP_DECODE_NO_LIVE)
int luamp_decodex(lua_State *L, const char *data, size_t len, int flags);
int luamp_decode(lua_State *L, const char *data, size_t len);  /* trusted */
/* A nil, boolean, number or string encoded without a buffer (for a queue's put, which
 * copies it once, straight into shared memory): writes the encoding's head (at most
 * LUAMP_PLAIN_HEAD bytes) and points tail at the string's own bytes that follow it
 * (none for the other types); returns the head's length, or 0 for a value that needs
 * luamp_encodex. The same bytes as luamp_encodex writes. Never raises. */
#define LUAMP_PLAIN_HEAD 16
size_t luamp_encode_plain(lua_State *L, int idx, unsigned char *head, const char **tail,
                          size_t *tail_len);
/* Whether len bytes are the encoding of one string; if so, *s and *slen are its bytes
 * (inside data), to be pushed without the decoder. */
int luamp_decoded_string(const char *data, size_t len, const char **s, size_t *slen);
/* Whether len bytes are the encoding of one nil, boolean or number; if so, pushes it (one
 * free stack slot needed; nothing allocated) and returns 1, else returns 0. */
int luamp_decode_plain(lua_State *L, const char *data, size_t len);
/* As _core.loads_into(data, dst, pos, n, at) (codec.c), on len bytes anywhere, into the
 * table at index dst: returns the number of values pushed (0, or 1 with at > 0), or -1
 * with the error object pushed. Never raises. */
int luamp_decode_into(lua_State *L, const char *data, size_t len, int dst, lua_Integer pos,
                      lua_Integer n, lua_Integer at);
/* As _core.dumpx(v, root, t, i, j) with those at stack 1..5 (codec.c), but the bytes stay
 * in the state's scratch buffer, good until the calling C function returns (the scratch is
 * left at stack 3 as a to-be-closed slot; the stack above 5 is dropped). Returns how many
 * descriptors the value needs; luamp_dumpx_push_fds then pushes their bundle. Raises. */
int luamp_dumpx_scratch(lua_State *L, const char **data, size_t *len);
int luamp_dumpx_push_fds(lua_State *L);

/* Handles: a luamp object (userdata or table) crosses the codec by reference when its
 * metatable has a field __luamp_handle = function(obj) -> type_name, payload. The payload
 * is any codec value (say {fd = 7, offset = 64}); the receiver rebuilds the object by
 * calling the function registered for type_name with _core.register_handle(type_name,
 * function(payload) -> obj). Registrations live in the registry table "luamp.handles". */
#define LUAMP_HANDLES_KEY "luamp.handles"
/* The integer field k of the handle payload table at t; Value error naming `what` if it
 * is missing or not an integer (a payload from a confused or hostile peer). */
lua_Integer luamp_handle_field(lua_State *L, int t, const char *what, const char *k);

/* ---- descriptors that travel with handles (handles.c) ----------------------------------
 * While a message is encoded for a transport that can carry descriptors (a Connection,
 * a Queue item, _core.dumpx), a carrier list is installed: handle hooks add the
 * descriptors their object needs (luamp_handle_send_fd, which returns the index to put
 * in the payload, with carried = true) instead of naming their own fd numbers. The list
 * borrows the descriptors. While a message is decoded, the received descriptors are
 * installed: rebuild functions take theirs (luamp_handle_recv_fd) and own them; the
 * transport closes whatever is left (luamp_fdlist_close). */
#define LUAMP_MAX_FDS 64
typedef struct luamp_fdlist { int n; int fd[LUAMP_MAX_FDS]; } luamp_fdlist;
/* Install l (emptied) as the list for encoding (NULL: none); returns the previous one. */
luamp_fdlist *luamp_fds_send_begin(luamp_fdlist *l);
void luamp_fds_send_end(luamp_fdlist *prev);
luamp_fdlist *luamp_fds_recv_begin(luamp_fdlist *l);
void luamp_fds_recv_end(luamp_fdlist *prev);
/* In a handle hook: index of fd in the message's list, or -1 when the message carries no
 * descriptors (luamp.dumps). Raises Serialize when the list is full. */
int luamp_handle_send_fd(lua_State *L, int fd);
/* In a rebuild function: takes the descriptor whose index is the payload's integer field
 * `field`; the caller owns it. Raises Value (naming `kind`) if it did not arrive. */
int luamp_handle_recv_fd(lua_State *L, int payload, const char *field, const char *kind);
/* Whether the payload at index `payload` says its descriptors travel with the message. */
int luamp_handle_is_carried(lua_State *L, int payload);
void luamp_fdlist_close(luamp_fdlist *l);
/* The identity registry: pushes the live object remembered under key and returns 1, or
 * returns 0 (pushing nothing); remember stores the object at idx under key (weakly). */
int luamp_handle_find(lua_State *L, const char *key);
void luamp_handle_remember(lua_State *L, int idx, const char *key);
/* Encode/decode with a carrier list (codec.c): as luamp_encodex/luamp_decodex. */
int luamp_encode_fds(lua_State *L, int idx, luamp_buf *b, const char *root, luamp_fdlist *out);
int luamp_decode_fds(lua_State *L, const char *data, size_t len, int flags, luamp_fdlist *in);
/* A new descriptor bundle (userdata luamp.fds, owning its descriptors) on the stack. */
luamp_fdlist *luamp_fds_push_bundle(lua_State *L);
/* The bundle at idx, or NULL when idx is nil/none. */
luamp_fdlist *luamp_fds_check_bundle(lua_State *L, int idx);

/* ---- processes (process.c) ------------------------------------------------------------ */

/* fork() with the runtime's discipline (stdio flushed, signals blocked across it, the
 * base's fork hooks run, child state reset). Returns as fork() does. `daemon` is one of: */
#define LUAMP_FORK_PLAIN 0    /* an ordinary child */
#define LUAMP_FORK_DAEMON 1   /* dies with its parent, may not start children */
#define LUAMP_FORK_WORKER 2   /* a pool worker: dies with its parent and is terminated at
                               * the end like a daemon, but may start children (nested pools) */
pid_t luamp_fork(int daemon);
/* True in a daemon process (which may not start children). */
int luamp_is_daemon(void);
/* True while a child this process forked is not yet reaped (repl.c's relay asks). */
int luamp_children_live(void);
/* Joins non-daemon children and terminates daemon ones; safe to call more than once.
 * Registered as an exit hook (program end, child exit) by luamp_open_process. */
void luamp_children_finish(void);
/* How a forked child leaves (never returning into its parent's program, never closing
 * the state it shares copy-on-write): its children settled, shared objects given back,
 * stdio flushed, _exit. The second makes os.exit in L leave that way. */
_Noreturn void luamp_child_exit(int code);
/* (Called in the parent before the fork: os.exit then leaves through luamp_child_exit
 * in every process luamp_fork made, and is the original os.exit elsewhere.) */
void luamp_install_child_os_exit(lua_State *L);

/* ---- the shared arena (arena.c) -------------------------------------------------------
 * Small cross-process objects live in blocks of one memfd-backed arena per process tree.
 * A luamp_ref, embedded in the userdata that owns it, is one counted reference to a
 * block; the block is freed when the last reference in any process is released. Create
 * the userdata (with its __gc) before calling luamp_ref_alloc/attach, which raise. */
struct luamp_arena;
typedef struct luamp_ref {
  void *ptr;                        /* the object's bytes (16-aligned); NULL once released */
  struct luamp_arena *arena;
  uint32_t off;
  pid_t owner;                      /* the process this reference is counted for */
  struct luamp_ref *prev, *next;    /* this process's live references, for fork */
} luamp_ref;

/* Block types: a handle only attaches to a block of the type it expects. */
enum {
  LUAMP_OBJ_LOCK = 1, LUAMP_OBJ_SEMAPHORE, LUAMP_OBJ_EVENT, LUAMP_OBJ_CONDITION,
  LUAMP_OBJ_BARRIER, LUAMP_OBJ_VALUE, LUAMP_OBJ_ARRAY
};

/* New zeroed object of `size` bytes; raises Value when shared memory is exhausted. */
void *luamp_ref_alloc(lua_State *L, luamp_ref *ref, unsigned type, size_t size);
/* Takes a reference on the object named by the handle payload at idx (as pushed by
 * luamp_ref_push_payload, possibly in another process); raises Value if the payload
 * does not name a live object of `type` with at least `size` bytes. */
void *luamp_ref_attach(lua_State *L, luamp_ref *ref, int idx, unsigned type, size_t size);
/* Pushes the handle payload for ref: with a carrier list installed (handles.c), the
 * arena's memfd travels with the message and the payload holds one in-flight reference
 * that the receiver adopts; without (luamp.dumps), it names the fd for /proc and pins the
 * object for good. */
void luamp_ref_push_payload(lua_State *L, const luamp_ref *ref);
/* Pushes the identity-registry key of the object ref points at (arena, block, generation). */
void luamp_ref_push_key(lua_State *L, const luamp_ref *ref);
/* Bytes usable at ref->ptr (at least the size asked for). */
size_t luamp_ref_capacity(const luamp_ref *ref);
/* Drops the reference; idempotent. */
void luamp_ref_release(luamp_ref *ref);
/* A luamp fork counts the references a child inherits, through fork hooks that
 * luamp_open_arena registers: prepare (parent, before fork) adds one per live reference,
 * child makes them the child's, parent takes them back if fork failed. A child forked any
 * other way (a raw fork()) inherits uncounted copies, which it never drops from the
 * shared count. A forked child drops every reference it holds as it leaves (an exit
 * hook). */
/* Adds the arena's private functions to the core table and registers its hooks; called
 * by luamp_open_sync. */
int luamp_open_arena(lua_State *L);

/* ---- futex waits (sync.c) -------------------------------------------------------------
 * The one place a futex is waited on (a futex cannot be polled like an fd, so a future
 * coroutine scheduler handles these here). Waits while *word == expect, until woken or
 * the deadline (luamp_now() seconds, <0 forever). Signals never end it early. Returns 0
 * when woken (or *word differed), 1 at the deadline, -2 when an interrupt is pending. */
int luamp_futex_wait(_Atomic uint32_t *word, uint32_t expect, double deadline);
void luamp_futex_wake(_Atomic uint32_t *word, int n);

/* ---- spawn start method (process.c starts, spawn.c is the child's side) ----------------
 * A spawn child runs `<exe> --luamp-spawn-child 3` with the start descriptor on fd 3:
 * a frame of LUAMP_SPAWN_MAGIC (8 bytes), the message length (8 bytes little-endian,
 * at most LUAMP_SPAWN_MAX), then the message (process.lua's spawn_payload). */
#define LUAMP_SPAWN_ARG "--luamp-spawn-child"
#define LUAMP_SPAWN_FD 3
#define LUAMP_SPAWN_MAGIC "LUAMPSP1"
#define LUAMP_SPAWN_HEADER 16
#define LUAMP_SPAWN_MAX ((size_t)1 << 30)

/* The frame of a start message on fd (the handles' descriptors ride on its header). */
void luamp_spawn_send_frame(int fd, const char *msg, size_t len, const luamp_fdlist *fds);

/* ---- forkserver start method (forkserver.c; process.c keeps the children) ---------------
 * The server runs `<exe> --luamp-forkserver 3 <creator pid>` with its control socket on
 * fd 3 (luamp_child_main calls luamp_forkserver_main). Its child's exit code comes on a
 * status socket, one int32 packet, which process.c reads. */
#define LUAMP_FORKSERVER_ARG "--luamp-forkserver"
/* Serves on ctl in L (libraries and luamp opened); a child runs its start frame with
 * run(L, fd, 0), which returns its exit code (spawn.c's). */
_Noreturn void luamp_forkserver_main(lua_State *L, int ctl, pid_t creator,
                                     int (*run)(lua_State *L, int fd, int fresh));
int luamp_open_forkserver(lua_State *L);
/* A Child handle (pushed) for a child the forkserver forked: watched through pidfd,
 * signalled with pidfd_send_signal, its exit code read from status_fd; takes both fds
 * (closed if it raises). */
void luamp_child_push_remote(lua_State *L, pid_t pid, int pidfd, int status_fd, int daemon);
/* Reaps this process's children that have ended (as every start does first). */
void luamp_reap_ended(void);
/* True in a child forked by a forkserver: its daemon and worker set-up was done by the
 * fork, against the server (its real parent). Set by forkserver.c. */
extern int luamp_forkserver_child;
/* True in a process that runtime/spawn.c started: a spawn child or a forkserver (and so
 * every forkserver child). Such a process inherits its starter's environment but is not
 * the program it describes (LUAMP_TRACE: lua/luamp/trace.lua). Set by spawn.c. */
extern int luamp_spawned;
/* The executable for spawn children: luamp_spawn_executable (base.h). */

/* The libuv loops (loop.c) are in the base layer: base.h. */

/* ---- module openers (one per concept file) -------------------------------------------- */
int luamp_open_error(lua_State *L);
int luamp_open_bytecode(lua_State *L);
/* Pushes readable text for any error value at idx (string; __tostring; a table's
 * message/msg field or its pformat) and returns it. Never raises but for memory. */
const char *luamp_push_error_text(lua_State *L, int idx);
/* Pushes the error at idx as text with co's traceback from `level`; a Remote error's
 * worker traceback comes first, as the cause. */
void luamp_push_error_report(lua_State *L, int idx, lua_State *co, int level);
int luamp_open_wait(lua_State *L);
int luamp_open_codec(lua_State *L);
int luamp_open_process(lua_State *L);
int luamp_open_repl(lua_State *L);
int luamp_open_sync(lua_State *L);
int luamp_open_shared(lua_State *L);
int luamp_open_subprocess(lua_State *L);
int luamp_open_connection(lua_State *L);
int luamp_open_queue(lua_State *L);
int luamp_open_pool(lua_State *L);
/* The Pool's shared-memory channel (ring.c); opened by luamp_open_pool. */
int luamp_open_ring(lua_State *L);
int luamp_open_handles(lua_State *L);
int luamp_open_redis(lua_State *L);    /* the broker: Redis connection and message seal */
int luamp_open_auth(lua_State *L);

#endif
