/* test_queue_scribble.c — a queue's header page is shared memory that any process holding
 * the queue can write, so garbage in it (the lock word, the state, the allocator's free
 * list and file size) must end in a luamp error ("shared memory is corrupt") or in
 * ordinary results, never in a crash or a hang. Each trial runs in a forked child: it
 * fills a queue, overwrites words or bytes of the header with pseudo-random values from a
 * seeded generator (deterministic, so a failing seed can be replayed: SCRIBBLE_SEED=n),
 * then uses the queue. A wait that garbage makes endless (a lock word naming a live
 * process that will never release it) is acceptable only if Ctrl-C ends it: the child
 * presses Ctrl-C (luamp_request_interrupt) every CTRL_C_EVERY seconds. The parent counts
 * children that died of a signal (crash) or still ran after TRIAL_LIMIT seconds (hang),
 * and fails if there is any. SCRIBBLE_TRIALS overrides the count. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <lualib.h>

#include "internal.h"
#include "luamp.h"

#define HEADER 8192
#define TRIAL_LIMIT 10.0      /* seconds: a child still running then counts as a hang */
#define CTRL_C_EVERY 0.5
#define PARALLEL 8
#define BATCH 25

static uint64_t rng;

static uint64_t next(void) {   /* xorshift64* */
  rng ^= rng >> 12;
  rng ^= rng << 25;
  rng ^= rng >> 27;
  return rng * 0x2545F4914F6CDD1DULL;
}

/* A value likely to mean something to the reader: sizes, offsets, counts, ids. */
static uint64_t garbage(uint64_t old) {
  switch (next() % 10) {
    case 0: return next();
    case 1: return next() % 16;
    case 2: return UINT64_MAX - next() % 4;
    case 3: return (uint64_t)1 << (next() % 64);
    case 4: return (next() % 4096) * 4096;
    case 5: return old + (next() % 9) - 4;
    case 6: return old ^ ((uint64_t)1 << (next() % 64));
    case 7: return (next() % 300) * (256 * 1024);
    case 8: return old * (next() % 5);
    default: return next() & 0xffffffffu;
  }
}

/* scribble(memfd, seed): overwrites the queue's header with garbage (1 to 3 changes) */
static int l_scribble(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  rng = (uint64_t)luaL_checkinteger(L, 2) * 0x9E3779B97F4A7C15ULL + 1;
  unsigned char *p = mmap(NULL, HEADER, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return luaL_error(L, "mmap failed");
  int changes = 1 + (int)(next() % 3);
  for (int i = 0; i < changes; i++) {
    /* most of the header's fields are in its first 512 bytes; the free list follows */
    size_t span = next() % 4 ? 512 : 2048;
    size_t off = next() % span;
    switch (next() % 4) {
      case 0: case 1: {   /* an aligned 64-bit word */
        off &= ~(size_t)7;
        uint64_t v;
        memcpy(&v, p + off, 8);
        v = garbage(v);
        memcpy(p + off, &v, 8);
        break;
      }
      case 2: {           /* an aligned 32-bit word */
        off &= ~(size_t)3;
        uint32_t v;
        memcpy(&v, p + off, 4);
        v = (uint32_t)garbage(v);
        memcpy(p + off, &v, 4);
        break;
      }
      default: {          /* a run of random bytes */
        size_t n = 1 + next() % 32;
        for (size_t k = 0; k < n && off + k < HEADER; k++) p[off + k] = (unsigned char)next();
      }
    }
  }
  munmap(p, HEADER);
  return 0;
}

/* trial(seed): fill, scribble, use; raises a non-luamp error only for a broken promise */
static const char *const trial_lua =
  "local luamp = require 'luamp'\n"
  "local seed = ...\n"
  "math.randomseed(seed)\n"
  "local kinds = {'Queue', 'JoinableQueue', 'SimpleQueue'}\n"
  "local kind = kinds[seed % 3 + 1]\n"
  "local q = luamp[kind](seed % 5 == 0 and 20 or nil)   -- room for what is put next\n"
  /* (a Ctrl-C pending makes a put raise Interrupted, having added nothing: put again) */
  "local function put(v)\n"
  "  local ok, e\n"
  "  repeat ok, e = pcall(q.put, q, v) until ok or not (type(e) == 'table' and e.kind == 'Interrupted')\n"
  "  if not ok then error(e, 0) end\n"
  "end\n"
  "for i = 1, math.random(0, 8) do\n"
  "  put(i)\n"
  "  if math.random() < 0.3 then put(string.rep('z', 40000 + i)) end\n"
  "end\n"
  "if math.random() < 0.5 then pcall(q.get, q, false) end\n"
  "local _, h = getmetatable(q).__luamp_handle(q)\n"
  "scribble(h.fd, seed)\n"
  "local function try(f, ...)\n"
  "  local ok, e = pcall(f, ...)\n"
  "  if not ok and not (type(e) == 'table' and e.kind) then error('not a luamp error: ' .. tostring(e), 0) end\n"
  "  return ok, e\n"
  "end\n"
  "for _ = 1, 12 do\n"
  "  local r = math.random(1, 9)\n"
  "  if r == 1 then try(q.put, q, 'x', false)\n"
  "  elseif r == 2 then try(q.put, q, string.rep('y', 50000), true, 0.01)\n"
  "  elseif r == 3 then try(q.get, q, true, 0.01)\n"
  "  elseif r == 4 and q.get_nowait then try(q.get_nowait, q)\n"
  "  elseif r == 5 and q.qsize then try(q.qsize, q)\n"
  "  elseif r == 6 and q.task_done then try(q.task_done, q)\n"
  "  elseif r == 7 and q.join then try(q.join, q, 0.01)\n"
  "  elseif r == 8 then try(tostring, q); try(q.empty, q)\n"
  "  else try(q.get, q, false) end\n"
  "end\n"
  "q:close()\n";

static int traceback(lua_State *L) {
  luaL_traceback(L, L, luaL_tolstring(L, 1, NULL), 1);
  return 1;
}

static volatile sig_atomic_t presses;

static void ctrl_c(int sig) {
  (void)sig;
  presses++;
  luamp_request_interrupt();
}

/* What each child is doing, for the parent: the seed of the trial it runs, and since when. */
struct slot { volatile long seed; volatile double start; };
static struct slot *slots;
static double now(void);

/* Starts a child that runs trials seed, seed+1, ... up to `end` (a fork per trial would
 * cost more than the trials), noting each in slots[k]. */
static pid_t start_trial(lua_State *L, long seed, long end, int k) {
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) { perror("fork"); exit(2); }
  if (pid == 0) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = ctrl_c;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, (long)(CTRL_C_EVERY * 1e6)}, {0, (long)(CTRL_C_EVERY * 1e6)}};
    setitimer(ITIMER_REAL, &it, NULL);
    int rc = 0;
    for (; seed < end && rc == 0; seed++) {
      slots[k].start = now();
      slots[k].seed = seed;
      lua_pushcfunction(L, traceback);
      if (luaL_loadstring(L, trial_lua) != LUA_OK) rc = 3;
      lua_pushinteger(L, seed);
      if (rc == 0 && lua_pcall(L, 1, 0, -3) != LUA_OK) {
        fprintf(stderr, "seed %ld: %s\n", seed, luaL_tolstring(L, -1, NULL));
        rc = 3;
      }
      lua_settop(L, 0);
    }
    fflush(NULL);
    _exit(rc == 0 && presses ? 4 : rc);
  }
  return pid;
}

/* How a child ended: 0 (fine), 1 (crash), 3 (broken promise), 4 (fine, sent Ctrl-C). */
static int outcome(long seed, int status) {
  if (WIFEXITED(status)) {
    int code = WEXITSTATUS(status);
    return code == 0 ? 0 : code == 4 ? 4 : 3;
  }
  fprintf(stderr, "seed %ld: crash (%s)\n", seed, strsignal(WTERMSIG(status)));
  return 1;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  lua_register(L, "scribble", l_scribble);
  long first = 1, trials = 2000;
  if (getenv("SCRIBBLE_SEED")) first = atol(getenv("SCRIBBLE_SEED")), trials = 1;
  if (getenv("SCRIBBLE_FIRST")) first = atol(getenv("SCRIBBLE_FIRST"));
  if (getenv("SCRIBBLE_TRIALS")) trials = atol(getenv("SCRIBBLE_TRIALS"));
  long counts[5] = {0};
  slots = mmap(NULL, sizeof *slots * PARALLEL, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (slots == MAP_FAILED) return 2;
  /* PARALLEL children at a time (the trials mostly sleep through short timeouts), each
   * running a batch of trials. When a trial crashes or hangs, the rest of its batch
   * goes on in a new child. */
  struct { pid_t pid; long from, end; int busy; } run[PARALLEL];
  memset(run, 0, sizeof run);
  long next_seed = first, last = first + trials;
  for (;;) {
    int any = 0;
    for (int k = 0; k < PARALLEL; k++) {
      if (!run[k].busy && next_seed < last) {
        run[k].from = next_seed;
        run[k].end = next_seed + BATCH < last ? next_seed + BATCH : last;
        next_seed = run[k].end;
      } else if (!run[k].busy) {
        continue;
      }
      if (!run[k].busy) {
        slots[k].seed = run[k].from;
        slots[k].start = now();
        run[k].pid = start_trial(L, run[k].from, run[k].end, k);
        run[k].busy = 1;
      }
      any = 1;
    }
    if (!any) break;
    usleep(1000);
    for (int k = 0; k < PARALLEL; k++) {
      if (!run[k].busy) continue;
      int status;
      pid_t r = waitpid(run[k].pid, &status, WNOHANG);
      if (r == 0 && now() - slots[k].start <= TRIAL_LIMIT) continue;
      run[k].busy = 0;
      long seed = slots[k].seed;
      int how;
      if (r == 0) {
        kill(run[k].pid, SIGKILL);
        while (waitpid(run[k].pid, &status, 0) < 0) {}
        fprintf(stderr, "seed %ld: hang\n", seed);
        how = 2;
      } else {
        how = outcome(seed, status);
      }
      if (how == 0 || how == 4) {
        counts[0] += run[k].end - run[k].from;
        if (how == 4) counts[4]++;
        continue;
      }
      counts[0] += seed - run[k].from;
      counts[how]++;
      if (seed + 1 < run[k].end) {   /* the rest of the batch, at once in this slot */
        run[k].from = seed + 1;
        slots[k].seed = run[k].from;
        slots[k].start = now();
        run[k].pid = start_trial(L, run[k].from, run[k].end, k);
        run[k].busy = 1;
      }
    }
  }
  lua_close(L);
  printf("test_queue_scribble: %ld trials: %ld fine, %ld crashes, %ld hangs, %ld broken promises "
         "(%ld batches ran long enough to be sent Ctrl-C)\n",
         trials, counts[0], counts[1], counts[2], counts[3], counts[4]);
  return counts[1] + counts[2] + counts[3] ? 1 : 0;
}
