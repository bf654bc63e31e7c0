/*
 * repl.c — the interactive read-eval-print loop (luamp_repl, in luamp.h).
 *
 * Each turn reads a statement, runs it and prints what it returned:
 *  - top-level `local` declarations become globals, so they outlive their line (see
 *    rewrite_locals);
 *  - a line is first tried as an expression (`return <line>;`, so `1+1` prints 2), then
 *    as a statement; while the parser's complaint ends in "<eof>" the statement is
 *    incomplete and the next line is appended (prompt `>>`), as lua.c does;
 *  - it runs through luamp_pcall_interruptible, so Ctrl-C stops it and the loop goes on;
 *  - results are printed by luamp.pprint (lua/luamp/pretty.lua), tab-separated, or by
 *    the global print when luamp is not loaded.
 * On a terminal lines come from libedit (readline interface) with a history file. With
 * anything else on stdin, lines are read plainly and no prompts are printed, so that
 * `printf '1+1\n' | luamp -i` prints just the results.
 *
 * At the prompt Ctrl-C discards what was typed. While reading, a SIGINT handler that
 * only sets a flag is installed (and the previous disposition put back after), and the
 * wait for a key (read_key) ends when the flag is set, instead of the signal killing the
 * program. libedit's own signal handling is off (it would re-send the signal to the
 * whole process group, children included). Input is decoded per LC_CTYPE, so the
 * environment's locale is in force while libedit works (and only then: Lua code runs in
 * the "C" locale, as under lua5.4).
 */
#include <limits.h>
#include <locale.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
#include <wchar.h>

#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <termios.h>

#include <editline/readline.h>

#include "internal.h"

#define REPL_HISTORY_LINES 1000
#define EOF_MARK "<eof>"

enum { READ_OK, READ_EOF, READ_INTERRUPTED };

typedef struct repl {
  int tty;                  /* stdin is a terminal: libedit, prompts, history */
  char *history;            /* history file, or NULL for none */
  char *line;               /* the line read, until it is a Lua string */
  int printer;              /* stack index of the function printing results */
} repl;

/* ---- reading lines -------------------------------------------------------------------- */

static volatile sig_atomic_t prompt_interrupted;

static void on_prompt_sigint(int sig) {
  (void)sig;
  prompt_interrupted = 1;
}

/* While reading, Ctrl-C only sets a flag, which ends the wait for input. */
static int catch_prompt_sigint(struct sigaction *old) {
  if (sigaction(SIGINT, NULL, old) < 0 || old->sa_handler == SIG_IGN) return 0;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_prompt_sigint;
  sigemptyset(&sa.sa_mask);
  return sigaction(SIGINT, &sa, NULL) == 0;
}

static const char *prompt_of(lua_State *L, int continuation) {
  const char *p = continuation ? ">> " : "> ";
  /* only a string: one held by a global outlives the pop (a converted number would not) */
  if (lua_getglobal(L, continuation ? "_PROMPT2" : "_PROMPT") == LUA_TSTRING)
    p = lua_tostring(L, -1);
  lua_pop(L, 1);
  return p;
}

/* libedit decodes and echoes input per LC_CTYPE (and decides at initialisation whether
 * the charset is UTF-8): the environment's locale is in force while it works. Returns
 * the locale to put back. */
static char *enter_user_locale(void) {
  const char *cur = setlocale(LC_CTYPE, NULL);
  char *saved = cur ? strdup(cur) : NULL;
  setlocale(LC_CTYPE, "");
  return saved;
}

static void leave_user_locale(char *saved) {
  if (!saved) return;
  setlocale(LC_CTYPE, saved);
  free(saved);
}

/* Decodes the n bytes read so far: 1 with *wc once they make a character; else 0 and
 * *n is how many to keep (bytes of an invalid sequence are dropped, as libedit does,
 * but its last byte may start the next character). */
static int decode_key(char *bytes, size_t *n, wchar_t *wc) {
  for (;;) {
    mbstate_t state;
    memset(&state, 0, sizeof state);
    size_t used = mbrtowc(wc, bytes, *n, &state);
    if (used == (size_t)-2 && *n < MB_LEN_MAX) return 0;       /* more bytes to come */
    if (used == (size_t)-1 && *n > 1) {
      bytes[0] = bytes[*n - 1];
      *n = 1;
      continue;
    }
    if (used == (size_t)-1 || used == (size_t)-2) {
      *n = 0;
      return 0;
    }
    *n = 0;
    return 1;
  }
}

/* ---- children's output at the prompt -------------------------------------------------
 * A child (a Process, a pool worker) that prints while the prompt is shown would write
 * over it and leave the line being typed garbled. On a terminal, the REPL gives the
 * children it forks a pty of its own as their stdout/stderr (child_stdio_fd, put in
 * place by a fork hook, base.h; they still see a terminal) and a thread copies what arrives to the real terminal. While the
 * prompt is shown, the thread first clears the prompt's line and, once the output is
 * written, wakes read_key through an eventfd, which has libedit redraw the prompt and
 * what was typed. Before the REPL writes, relay_settle asks the thread to write out what
 * the pty holds and waits for its answer (two more eventfds). The statements' own writes
 * to the terminal (print, io.write, a write method on io.stdout/io.stderr: the REPL
 * wraps them, relay_wrap_writes) settle first too, but only while children's output may
 * be on its way (relay_before_user_write), so they cost nothing more when no child was
 * forked or all are reaped and relayed. The thread uses only
 * poll/read/write/ioctl on fds it owns and atomics (no stdio, no locks), so a fork at any
 * moment is safe; it runs until the program ends, as children may outlive
 * the REPL. External commands (luamp.subprocess) keep the real terminal. */

static int relay_tty = -1;          /* the real terminal, for the thread's writes */
static int relay_master = -1;       /* the pty's master: what children wrote */
static int relay_event = -1;        /* eventfd: output was written over the prompt */
static int relay_ask = -1;          /* eventfd: relay_settle asked (relay_asked moved) */
static int relay_told = -1;         /* eventfd: the thread answered (relay_answered moved) */
static atomic_int relay_at_prompt;
static atomic_int relay_alive;      /* the thread runs (it stops at a read error) */
static atomic_ullong relay_asked;   /* settle requests made, by the main thread */
static atomic_ullong relay_answered;/* the latest request whose output is all written */
static atomic_int relay_holding;    /* the thread has read output it has not yet written */
static atomic_int relay_children;   /* a child was forked since the relay was last found
                                     * idle with none alive (relay_before_user_write) */
static int child_stdio_fd = -1;     /* the pty's slave end, for children */

/* A settle counts what the pty holds again, once what it counted is written, at most
 * this many times: more may have waited behind it (see relay_main), but a child printing
 * without pause must not hold the prompt up for ever. */
#define RELAY_MAX_REFILLS 16
/* relay_settle waits at most this long for an answer; only a terminal that takes no
 * output (Ctrl-S) or a thread that never runs comes near it. */
#define RELAY_SETTLE_GUARD_MS 2000

/* The fork hook: a child's terminal stdout/stderr become the pty the relay reads. */
static void relay_child_after_fork(void) {
  if (isatty(STDOUT_FILENO)) dup2(child_stdio_fd, STDOUT_FILENO);
  if (isatty(STDERR_FILENO)) dup2(child_stdio_fd, STDERR_FILENO);
  /* the child has no relay thread: its wrapped print must not ask the parent's (the
   * eventfds are shared), nor wait for an answer */
  relay_master = -1;
  atomic_store(&relay_alive, 0);
  atomic_store(&relay_children, 0);
}

static void relay_parent_after_fork(pid_t pid) {
  (void)pid;
  atomic_store_explicit(&relay_children, 1, memory_order_relaxed);
}

static void write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    p += w;
    n -= (size_t)w;
  }
}

static void post_event(int fd) {
  uint64_t one = 1;
  if (write(fd, &one, sizeof one) < 0) { /* already signalled */ }
}

static void drain_event(int fd) {
  uint64_t v;
  while (read(fd, &v, sizeof v) > 0) {}
}

/* What the pty holds unread. poll() first: a child's write reaches the master's line
 * discipline through a kernel work item, after the write has returned, and FIONREAD
 * alone does not count what that item still carries; poll on the master completes it,
 * but only when the line discipline holds nothing (with something there it answers at
 * once), so a count of more than 0 may leave bytes out. */
static int relay_unread(void) {
  struct pollfd pf = {.fd = relay_master, .events = POLLIN};
  int pending = 0;
  if (poll(&pf, 1, 0) <= 0 || ioctl(relay_master, FIONREAD, &pending) < 0) return 0;
  return pending;
}

/* The relay thread is the master's only reader, so it alone can say which bytes were
 * already in the pty when a settle was asked for: it counts them at the request (its own
 * reads cannot run in between), writes that many to the terminal, and counts again, until
 * a count finds the pty empty. Only such a count is sure to see everything written before
 * it (relay_unread: a work item may still carry bytes behind those counted; and the line
 * discipline's buffer holds 4095, more waits behind a full one). A child that keeps
 * printing delays the answer by at most RELAY_MAX_REFILLS buffers, not for ever. */
static void *relay_main(void *arg) {
  (void)arg;
  char buf[4096], out[4096 + 8];
  unsigned long long ticket = 0;   /* the request being served, 0: none */
  long owed = 0;                   /* bytes of it still to write */
  int refills = 0;                 /* counts again made for it */
  for (;;) {
    if (ticket && owed == 0) {
      if (refills++ < RELAY_MAX_REFILLS) owed = relay_unread();
      if (owed == 0) {
        atomic_store(&relay_answered, ticket);
        post_event(relay_told);
        ticket = 0;
      }
    }
    struct pollfd pf[2] = {{.fd = relay_master, .events = POLLIN}, {.fd = relay_ask, .events = POLLIN}};
    if (poll(pf, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (pf[1].revents & POLLIN) {
      drain_event(relay_ask);
      /* a newer request counts everything unread again, an older one's bytes included */
      ticket = atomic_load(&relay_asked);
      refills = 0;
      owed = relay_unread();
      continue;
    }
    if (!(pf[0].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    /* set before the read: from when the bytes leave the pty until they are written,
     * relay_quiet sees them here */
    atomic_store(&relay_holding, 1);
    ssize_t n = read(relay_master, buf, sizeof buf);   /* non-blocking */
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
      atomic_store(&relay_holding, 0);
      continue;
    }
    if (n <= 0) break;
    int prompt = atomic_load(&relay_at_prompt);
    size_t k = 0;
    if (prompt) { memcpy(out, "\r\33[K", 4); k = 4; }
    memcpy(out + k, buf, (size_t)n);         /* the real terminal expands \n itself */
    k += (size_t)n;
    if (prompt && buf[n - 1] != '\n') { out[k++] = '\r'; out[k++] = '\n'; }
    write_all(relay_tty, out, k);
    atomic_store(&relay_holding, 0);
    if (prompt) post_event(relay_event);
    if (ticket) owed = owed > n ? owed - n : 0;
  }
  atomic_store(&relay_holding, 0);
  atomic_store(&relay_alive, 0);
  post_event(relay_told);
  return NULL;
}

/* Best effort: without a pty (or a thread) children write to the terminal directly. */
static void relay_start(void) {
  if (relay_master >= 0 || !isatty(STDOUT_FILENO)) return;
  int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
  if (master < 0) return;
  int slave = -1, tty = -1, ev = -1, ask = -1, told = -1;
  if (grantpt(master) < 0 || unlockpt(master) < 0) goto fail;
  const char *name = ptsname(master);
  if (!name) goto fail;
  slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
  tty = fcntl(STDOUT_FILENO, F_DUPFD_CLOEXEC, 3);
  ev = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  ask = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  told = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (slave < 0 || tty < 0 || ev < 0 || ask < 0 || told < 0) goto fail;
  struct termios t;
  if (tcgetattr(slave, &t) == 0) {
    t.c_oflag &= (tcflag_t)~OPOST;         /* bytes through unchanged */
    tcsetattr(slave, TCSANOW, &t);
  }
  struct winsize ws;
  if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0) ioctl(slave, TIOCSWINSZ, &ws);
  relay_master = master;
  relay_tty = tty;
  relay_event = ev;
  relay_ask = ask;
  relay_told = told;
  atomic_store(&relay_alive, 1);
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);  /* signals stay the main thread's */
  pthread_t th;
  pthread_attr_t at;
  pthread_attr_init(&at);
  pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
  int rc = pthread_create(&th, &at, relay_main, NULL);
  pthread_attr_destroy(&at);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc != 0) {
    atomic_store(&relay_alive, 0);
    relay_master = relay_tty = relay_event = relay_ask = relay_told = -1;
    goto fail;
  }
  child_stdio_fd = slave;
  luamp_atfork(NULL, relay_parent_after_fork, relay_child_after_fork);
  return;
fail:
  if (slave >= 0) close(slave);
  if (tty >= 0) close(tty);
  if (ev >= 0) close(ev);
  if (ask >= 0) close(ask);
  if (told >= 0) close(told);
  close(master);
}

/* Before the REPL writes (results, the prompt, an error, a statement's print): what
 * children wrote so far goes out first, so that a child's line printed before p:join()
 * returned shows above what comes next. Asks the relay thread and waits for its answer
 * (relay_main says which bytes that covers), not for a quiet moment: the thread may hold
 * a chunk it has read and not yet written. A Ctrl-C ends the wait (within a
 * LUAMP_WAIT_SLICE, should it land just before a poll): it is raised when the code goes
 * on, or discards the line at the prompt. */
static void relay_settle(void) {
  if (relay_master < 0 || !atomic_load(&relay_alive)) return;
  unsigned long long ticket = atomic_fetch_add(&relay_asked, 1) + 1;
  post_event(relay_ask);
  double deadline = luamp_now() + RELAY_SETTLE_GUARD_MS / 1000.0;
  while (atomic_load(&relay_answered) < ticket && atomic_load(&relay_alive)) {
    if (prompt_interrupted || luamp_interrupt_pending()) return;
    double left = deadline - luamp_now();
    if (left <= 0) return;
    if (left > LUAMP_WAIT_SLICE) left = LUAMP_WAIT_SLICE;
    struct pollfd pf = {.fd = relay_told, .events = POLLIN};
    if (poll(&pf, 1, (int)(left * 1000) + 1) > 0) drain_event(relay_told);
  }
}

/* Whether nothing children wrote is on its way: the pty holds nothing (poll also
 * completes a write still in the kernel, see relay_unread) and the thread holds nothing.
 * In that order: bytes gone from the pty when it is looked at were read with
 * relay_holding set, which stays set until they are written. */
static int relay_quiet(void) {
  struct pollfd pf = {.fd = relay_master, .events = POLLIN};
  if (poll(&pf, 1, 0) != 0) return 0;
  return !atomic_load(&relay_holding);
}

/* Before a statement's own write to the terminal. Without a child forked since the relay
 * was last idle with none alive, nothing can be on its way: no system call. */
static void relay_before_user_write(void) {
  if (relay_master < 0 || !atomic_load_explicit(&relay_children, memory_order_relaxed)) return;
  if (!relay_quiet()) {
    relay_settle();
  } else if (!luamp_children_live()) {
    /* children are forked by this thread only, so none can come in between */
    atomic_store_explicit(&relay_children, 0, memory_order_relaxed);
  }
}

/* The wrappers: upvalue 1 is the function wrapped, a C function without upvalues
 * (relay_wrap sees to it), run in the wrapper's own frame: no call more, and an error or
 * a traceback names the function as before. */
static int relay_call_wrapped(lua_State *L) {
  return lua_tocfunction(L, lua_upvalueindex(1))(L);
}

static int relay_print(lua_State *L) {
  relay_before_user_write();
  return relay_call_wrapped(L);
}

/* file:write: only a write to the terminal's streams waits; other files stay as fast. */
static int relay_file_write(lua_State *L) {
  const luaL_Stream *s = luaL_testudata(L, 1, LUA_FILEHANDLE);
  if (s && s->closef && (s->f == stdout || s->f == stderr)) relay_before_user_write();
  return relay_call_wrapped(L);
}

/* Replaces the C function at t[name] (t on top) by fn wrapping it; anything else (a
 * function the code replaced already) is left alone. */
static void relay_wrap(lua_State *L, const char *name, lua_CFunction fn) {
  int top = lua_gettop(L);
  lua_getfield(L, -1, name);
  if (!lua_tocfunction(L, -1) || lua_getupvalue(L, -1, 1)) {
    lua_settop(L, top);
    return;
  }
  lua_pushcclosure(L, fn, 1);
  lua_setfield(L, -2, name);
}

/* With the relay running: print, io.write and the files' write method settle it first
 * (io.write always: its file is io.output(), the terminal unless the code changed it). */
static void relay_wrap_writes(lua_State *L) {
  if (relay_master < 0) return;
  int top = lua_gettop(L);
  lua_pushglobaltable(L);
  relay_wrap(L, "print", relay_print);
  if (lua_getfield(L, -1, "io") == LUA_TTABLE) relay_wrap(L, "write", relay_print);
  lua_settop(L, top);
  if (luaL_getmetatable(L, LUA_FILEHANDLE) == LUA_TTABLE &&
      lua_getfield(L, -1, "__index") == LUA_TTABLE)
    relay_wrap(L, "write", relay_file_write);
  lua_settop(L, top);
}

/* In read_key: output was written over the prompt; draw it again with what was typed. */
static void relay_redraw(void) {
  drain_event(relay_event);
  rl_forced_update_display();
}

/* libedit reads keys through this (rl_getc_function). SIGINT stays blocked except inside
 * ppoll, so a Ctrl-C is seen whether it comes before the wait or during it (with a
 * plain read() one landing just before would go unnoticed until the next key). Returns
 * a character decoded per LC_CTYPE, or EOF at end of input or on Ctrl-C. */
static int read_key(FILE *in) {
  int fd = fileno(in);
  char bytes[MB_LEN_MAX];
  size_t n = 0;
  sigset_t sigint, outside, inside;
  sigemptyset(&sigint);
  sigaddset(&sigint, SIGINT);
  for (;;) {
    sigprocmask(SIG_BLOCK, &sigint, &outside);
    inside = outside;
    sigdelset(&inside, SIGINT);
    int ready = 0;
    struct pollfd pfd[2] = {{.fd = fd, .events = POLLIN}, {.fd = relay_event, .events = POLLIN}};
    if (!prompt_interrupted) ready = ppoll(pfd, relay_event >= 0 ? 2 : 1, NULL, &inside);
    int err = errno;
    sigprocmask(SIG_SETMASK, &outside, NULL);
    if (prompt_interrupted) return EOF;
    if (ready < 0) {
      if (err == EINTR) continue;
      return EOF;
    }
    if (relay_event >= 0 && pfd[1].revents) {
      relay_redraw();
      if (!pfd[0].revents) continue;
    }
    ssize_t got = read(fd, bytes + n, 1);
    if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (got <= 0) return EOF;
    n++;
    wchar_t wc;
    if (decode_key(bytes, &n, &wc)) return (int)wc;
  }
}

static char *edit_line(const char *prompt) {
  char *saved = enter_user_locale();
  relay_settle();
  atomic_store(&relay_at_prompt, 1);
  char *line = readline(prompt);
  atomic_store(&relay_at_prompt, 0);
  int err = errno;
  leave_user_locale(saved);
  errno = err;
  return line;
}

static char *plain_line(void) {
  char *line = NULL;
  size_t cap = 0;
  ssize_t n = getline(&line, &cap, stdin);
  if (n < 0) {
    int err = errno;
    free(line);
    clearerr(stdin);        /* an EINTR must not look like end of input next time */
    errno = err;
    return NULL;
  }
  if (n > 0 && line[n - 1] == '\n') line[--n] = '\0';
  if (n > 0 && line[n - 1] == '\r') line[--n] = '\0';
  return line;
}

/* Reads one line and pushes it (READ_OK), or pushes nothing (READ_EOF, READ_INTERRUPTED). */
static int read_line(lua_State *L, repl *r, int continuation) {
  const char *prompt = prompt_of(L, continuation);
  struct sigaction old;
  prompt_interrupted = 0;
  int installed = catch_prompt_sigint(&old);
  fflush(stdout);
  r->line = r->tty ? edit_line(prompt) : plain_line();
  if (installed) sigaction(SIGINT, &old, NULL);
  if (!r->line) {
    if (!prompt_interrupted) return READ_EOF;
    if (r->tty) fputc('\n', rl_outstream);
    return READ_INTERRUPTED;
  }
  lua_pushstring(L, r->line);
  free(r->line);
  r->line = NULL;
  return READ_OK;
}

/* ---- history ------------------------------------------------------------------------ */

static char *history_path(void) {
  const char *env = getenv("LUAMP_HISTORY");
  if (env) return env[0] ? strdup(env) : NULL;
  const char *home = getenv("HOME");
  if (!home || !home[0]) return NULL;
  size_t n = strlen(home) + sizeof "/.luamp_history";
  char *p = malloc(n);
  if (p) snprintf(p, n, "%s/.luamp_history", home);
  return p;
}

static void history_begin(repl *r) {
  r->history = history_path();
  using_history();
  stifle_history(REPL_HISTORY_LINES);
  if (r->history) read_history(r->history);      /* a missing file is a first session */
}

/* Saved after every entry so that a session ended by os.exit() or a crash keeps it; an
 * unwritable file (read-only HOME) just means no saved history. */
static void history_add(repl *r, const char *entry) {
  if (!r->tty || !entry[0]) return;
  add_history(entry);
  if (r->history) write_history(r->history);
}

/* ---- compiling a statement ------------------------------------------------------------ */

/* A syntax error at the end of the input: more lines may complete the statement. */
static int incomplete(lua_State *L, int status) {
  if (status != LUA_ERRSYNTAX) return 0;
  size_t len;
  const char *msg = lua_tolstring(L, -1, &len);
  size_t mark = sizeof EOF_MARK - 1;
  return msg && len >= mark && strcmp(msg + len - mark, EOF_MARK) == 0;
}

/* Whether the chunk on top reads as the start of an expression: `1 +` or `{1,` are not
 * statements at all, yet more lines can complete them as expressions. */
static int incomplete_expression(lua_State *L) {
  const char *ret = lua_pushfstring(L, "return %s", lua_tostring(L, -1));
  int status = luaL_loadbuffer(L, ret, strlen(ret), "=stdin");
  int more = incomplete(L, status);
  lua_pop(L, 2);
  return more;
}

/* With the line on top: replaces it by the compiled `return <line>;` if that compiles. */
static int try_expression(lua_State *L, repl *r) {
  const char *line = lua_tostring(L, -1);
  const char *ret = lua_pushfstring(L, "return %s;", line);
  int status = luaL_loadbuffer(L, ret, strlen(ret), "=stdin");
  if (status == LUA_OK) {
    history_add(r, line);
    lua_replace(L, -3);           /* the function takes the line's place */
    lua_pop(L, 1);
  } else {
    lua_pop(L, 2);                /* the error and the `return` text */
  }
  return status;
}

/* ---- top-level locals ------------------------------------------------------------------
 * Each entry is a chunk of its own, so a `local` typed at the prompt would vanish with its
 * line. The REPL therefore rewrites the top-level declarations of an entry (not those
 * inside a function or block) into assignments to globals before running it:
 *   local x, y = 1, 2   ->   x, y = 1, 2
 *   local z             ->   z = nil;
 *   local function f()  ->   function f()
 * so later lines see them, and pool workers too (as globals). The word `local` is blanked
 * rather than removed, so error positions stay where they were typed. A declaration with
 * an attribute (`<close>`, `<const>`) is left a real local: its point is its scope. */

typedef struct scan { const char *s; size_t n, i; } scan;

static int name_char(int c) {
  return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* At `[`: the level of a long bracket `[==[` (number of '='), or -1 if it is not one. */
static int long_bracket(const scan *sc, size_t at) {
  size_t j = at + 1;
  while (j < sc->n && sc->s[j] == '=') j++;
  return j < sc->n && sc->s[j] == '[' ? (int)(j - at - 1) : -1;
}

static void skip_long(scan *sc, int level) {
  sc->i += (size_t)level + 2;
  while (sc->i < sc->n) {
    if (sc->s[sc->i] == ']') {
      size_t j = sc->i + 1;
      while (j < sc->n && sc->s[j] == '=') j++;
      if (j < sc->n && sc->s[j] == ']' && (int)(j - sc->i - 1) == level) {
        sc->i = j + 1;
        return;
      }
    }
    sc->i++;
  }
}

/* Skips blanks and comments. */
static void skip_space(scan *sc) {
  while (sc->i < sc->n) {
    char c = sc->s[sc->i];
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
      sc->i++;
    } else if (c == '-' && sc->i + 1 < sc->n && sc->s[sc->i + 1] == '-') {
      sc->i += 2;
      int level = sc->i < sc->n && sc->s[sc->i] == '[' ? long_bracket(sc, sc->i) : -1;
      if (level >= 0) skip_long(sc, level);
      else while (sc->i < sc->n && sc->s[sc->i] != '\n') sc->i++;
    } else {
      return;
    }
  }
}

/* Moves past the token at sc->i (after skip_space); *word gets a name's length (0 for
 * anything else) so the caller can look at it. */
static void next_token(scan *sc, size_t *word) {
  *word = 0;
  if (sc->i >= sc->n) return;
  char c = sc->s[sc->i];
  if (name_char((unsigned char)c)) {
    size_t j = sc->i;
    while (j < sc->n && name_char((unsigned char)sc->s[j])) j++;
    if (!(c >= '0' && c <= '9')) *word = j - sc->i;
    else while (j < sc->n && (name_char((unsigned char)sc->s[j]) || sc->s[j] == '.')) j++;
    sc->i = j;
  } else if (c == '"' || c == '\'') {
    sc->i++;
    while (sc->i < sc->n && sc->s[sc->i] != c && sc->s[sc->i] != '\n') {
      if (sc->s[sc->i] == '\\') sc->i++;
      sc->i++;
    }
    sc->i++;
  } else if (c == '[' && long_bracket(sc, sc->i) >= 0) {
    skip_long(sc, long_bracket(sc, sc->i));
  } else {
    sc->i++;
  }
}

static int is_word(const scan *sc, size_t at, size_t len, const char *w) {
  return len == strlen(w) && memcmp(sc->s + at, w, len) == 0;
}

/* Pushes the entry with its top-level locals rewritten and returns 1, or returns 0 (and
 * pushes nothing) when there are none. */
static int rewrite_locals(lua_State *L, const char *src, size_t len) {
  enum { MAX_EDITS = 64 };
  struct { size_t at; int insert_nil; } edits[MAX_EDITS];
  int nedits = 0, depth = 0;
  scan sc = {src, len, 0};
  for (;;) {
    skip_space(&sc);
    if (sc.i >= sc.n) break;
    size_t at = sc.i, w;
    next_token(&sc, &w);
    if (!w) continue;
    if (is_word(&sc, at, w, "function") || is_word(&sc, at, w, "do") ||
        is_word(&sc, at, w, "if") || is_word(&sc, at, w, "repeat")) {
      depth++;
    } else if (is_word(&sc, at, w, "end") || is_word(&sc, at, w, "until")) {
      if (depth > 0) depth--;
    } else if (depth == 0 && is_word(&sc, at, w, "local") && nedits < MAX_EDITS) {
      scan look = sc;
      skip_space(&look);
      size_t nat = look.i, nw;
      next_token(&look, &nw);
      if (nw && is_word(&look, nat, nw, "function")) {
        edits[nedits].at = at;
        edits[nedits++].insert_nil = 0;
        continue;                 /* `function` opens a block: the main scan counts it */
      }
      /* a name list: name {, name}; an attribute keeps the declaration local */
      int ok = nw > 0, attrib = 0;
      size_t names_end = look.i;
      while (ok) {
        skip_space(&look);
        if (look.i < look.n && look.s[look.i] == '<') { attrib = 1; break; }
        if (look.i < look.n && look.s[look.i] == ',') {
          look.i++;
          skip_space(&look);
          size_t a2 = look.i;
          next_token(&look, &nw);
          ok = nw > 0 && a2 < look.n;
          names_end = look.i;
          continue;
        }
        break;
      }
      if (!ok || attrib) continue;
      int assigned = look.i < look.n && look.s[look.i] == '=' &&
                     !(look.i + 1 < look.n && look.s[look.i + 1] == '=');
      edits[nedits].at = at;
      edits[nedits++].insert_nil = 0;
      if (!assigned && nedits < MAX_EDITS) {
        edits[nedits].at = names_end;
        edits[nedits++].insert_nil = 1;
      }
      sc.i = names_end;
    }
  }
  if (nedits == 0) return 0;
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  size_t from = 0;
  for (int k = 0; k < nedits; k++) {
    luaL_addlstring(&b, src + from, edits[k].at - from);
    if (edits[k].insert_nil) {
      luaL_addstring(&b, " = nil;");
      from = edits[k].at;
    } else {
      luaL_addstring(&b, "     ");          /* `local`, blanked */
      from = edits[k].at + 5;
    }
  }
  luaL_addlstring(&b, src + from, len - from);
  luaL_pushresult(&b);
  return 1;
}

/* With the chunk's text at -2 and its compiled function on top: the function of the
 * rewritten text instead, when it has top-level locals (and still compiles). */
static void persist_locals(lua_State *L) {
  size_t len;
  const char *src = lua_tolstring(L, -2, &len);
  if (!rewrite_locals(L, src, len)) return;
  size_t rlen;
  const char *rsrc = lua_tolstring(L, -1, &rlen);
  if (luaL_loadbuffer(L, rsrc, rlen, "=stdin") == LUA_OK) {
    lua_replace(L, -3);           /* the new function takes the old one's place */
    lua_pop(L, 1);
  } else {
    lua_pop(L, 2);
  }
}

/* With the line on top: compiles it as a statement, reading more lines while it is
 * incomplete. Leaves the function or the error message in the line's place. Each
 * longer chunk is tried as an expression first, so that one spread over lines prints. */
static int read_statement(lua_State *L, repl *r, int *ended) {
  for (int first = 1;; first = 0) {
    if (!first && try_expression(L, r) == LUA_OK) return LUA_OK;
    size_t len;
    const char *chunk = lua_tolstring(L, -1, &len);
    int status = luaL_loadbuffer(L, chunk, len, "=stdin");
    int more = incomplete(L, status);
    if (!more && status == LUA_ERRSYNTAX) {
      lua_pushvalue(L, -2);
      more = incomplete_expression(L);
      lua_pop(L, 1);
    }
    if (!more) {
      history_add(r, chunk);
      if (status == LUA_OK) persist_locals(L);
      lua_remove(L, -2);
      return status;
    }
    int rd = read_line(L, r, 1);
    if (rd != READ_OK) {
      if (rd == READ_INTERRUPTED) {
        lua_pop(L, 2);
        return -1;
      }
      *ended = 1;                   /* end of input mid-statement: report the error */
      history_add(r, chunk);
      lua_remove(L, -2);
      return status;
    }
    lua_remove(L, -2);              /* the <eof> error */
    lua_pushliteral(L, "\n");
    lua_insert(L, -2);
    lua_concat(L, 3);
  }
}

/* Pushes the next statement compiled (LUA_OK) or its error message (another status).
 * Returns -1 when the input ended or was discarded by Ctrl-C (then nothing is pushed;
 * *ended tells which). */
static int next_statement(lua_State *L, repl *r, int *ended) {
  int rd = read_line(L, r, 0);
  if (rd != READ_OK) {
    *ended = rd == READ_EOF;
    return -1;
  }
  const char *line = lua_tostring(L, -1);
  if (line[0] == '=') {             /* `=expr`, as in Lua 5.1 to 5.3 */
    lua_pushfstring(L, "return %s", line + 1);
    lua_remove(L, -2);
  }
  if (try_expression(L, r) == LUA_OK) return LUA_OK;
  return read_statement(L, r, ended);     /* which tries the expression no more */
}

/* ---- running and printing ------------------------------------------------------------- */

#define C_FRAME "\n\t[C]: in ?"

/* The error as text (luamp_traceback: any value reads well, a Remote error shows the
 * worker's traceback first) and where it happened, down to the statement typed: the C frames below it are the REPL's own. */
static int traceback_handler(lua_State *L) {
  luamp_traceback(L);
  size_t len;
  const char *tb = lua_tolstring(L, -1, &len);
  size_t frame = sizeof C_FRAME - 1, keep = len;
  while (keep >= frame && memcmp(tb + keep - frame, C_FRAME, frame) == 0) keep -= frame;
  lua_pushlstring(L, tb, keep);
  return 1;
}

static void report(lua_State *L, const char *what) {
  const char *msg = lua_tostring(L, -1);
  fflush(stdout);
  if (what) fprintf(stderr, "%s (%s)\n", what, msg ? msg : "?");
  else fprintf(stderr, "%s\n", msg ? msg : "(error object is not a string)");
  fflush(stderr);
  lua_pop(L, 1);
}

/* Runs the function on top; leaves its results above `base` or reports its error. */
static int run(lua_State *L, int nargs, int nresults) {
  int fn = lua_gettop(L) - nargs;
  lua_pushcfunction(L, traceback_handler);
  lua_insert(L, fn);
  int status = luamp_pcall_interruptible(L, nargs, nresults, fn);
  lua_remove(L, fn);
  return status;
}

static void print_results(lua_State *L, repl *r, int base) {
  relay_settle();
  int n = lua_gettop(L) - base;
  if (n == 0) return;
  luaL_checkstack(L, 2, "too many results to print");
  lua_pushvalue(L, r->printer);
  lua_insert(L, base + 1);
  if (run(L, n, 0) != LUA_OK) report(L, "error printing the results");
}

/* The printer: luamp.pretty's pprint, or the global print without luamp. */
static void push_printer(lua_State *L) {
  lua_getglobal(L, "require");
  lua_pushliteral(L, "luamp.pretty");
  if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_istable(L, -1)) {
    lua_getfield(L, -1, "pprint");
    lua_remove(L, -2);
    if (lua_isfunction(L, -1)) return;
  }
  lua_pop(L, 1);
  lua_getglobal(L, "print");
}

static void banner(void) {
  printf("luamp %s (%s)  Ctrl-C stops the running code, Ctrl-D exits\n",
         LUAMP_VERSION, LUA_RELEASE);
}

static void setup_terminal(lua_State *L, repl *r) {
  rl_readline_name = "luamp";          /* for "luamp:" lines in ~/.editrc */
  rl_catch_signals = 0;
  rl_getc_function = read_key;
  rl_outstream = isatty(STDOUT_FILENO) ? stdout : stderr;
  char *saved = enter_user_locale();
  rl_initialize();
  relay_start();
  relay_wrap_writes(L);
  history_begin(r);
  leave_user_locale(saved);
  banner();
}

/* The loop, in protected mode: the repl's C-held memory is freed by luamp_repl. */
static int repl_loop(lua_State *L) {
  repl *r = lua_touserdata(L, 1);
  lua_settop(L, 0);
  push_printer(L);
  r->printer = lua_gettop(L);
  if (r->tty) setup_terminal(L, r);
  for (;;) {
    int ended = 0;
    int status = next_statement(L, r, &ended);
    if (status == -1) {
      if (ended) break;
      continue;
    }
    if (status == LUA_OK) status = run(L, 0, LUA_MULTRET);
    if (status == LUA_OK) {
      print_results(L, r, r->printer);
    } else {
      relay_settle();           /* the error shows below what children wrote before it */
      report(L, NULL);
    }
    lua_settop(L, r->printer);
    fflush(stdout);
    if (ended) break;
  }
  if (r->tty) fputc('\n', rl_outstream);
  return 0;
}

int luamp_repl(lua_State *L) {
  repl r = {.tty = isatty(STDIN_FILENO), .history = NULL, .line = NULL, .printer = 0};
  lua_pushcfunction(L, repl_loop);
  lua_pushlightuserdata(L, &r);
  int status = lua_pcall(L, 1, 0, 0);
  if (status != LUA_OK) report(L, "luamp: the REPL failed");
  fflush(stdout);
  free(r.line);
  free(r.history);
  return status == LUA_OK ? 0 : 1;
}

int luamp_open_repl(lua_State *L) {
  (void)L;
  return 0;
}
