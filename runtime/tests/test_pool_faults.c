/* test_pool_faults.c — a Pool's big map takes few page faults, in the parent and its
 * workers together: on this project's virtual machines a fault costs about 14 us (see
 * luamp_populate, pool.c), so a map that moved its chunks through freshly touched pages
 * spent more on faults than on its work. The faults are counted by the kernel's software
 * event (perf_event_open, inherited by the workers: their counts join the parent's when
 * they exit), for a whole pool's life with a map of N items, less the same life with a
 * map of 4; medians of a few lives. A kernel that does not let a process count its own
 * faults skips the test (said on stdout). */
#include <limits.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* Budgets: faults of a map of 400,000 items of x*x beyond a map of 4, on Pool(2) and
 * Pool(8), the pool made first as in scripts/bench/pool.sh. Before the rings, the codec's
 * big buffers and the workers' tables were mapped ahead and the chunk arguments went
 * straight into the ring (ring.c, codec.c, pool.c, pool.lua): 2,595 and 3,083; then 292
 * and 1,050; with a worker's heap copied before its first big chunk (own_heap,
 * pool.c): 125..137 and 390..406. */
#define N_ITEMS 400000
#define POOL2_MAX 500
#define POOL8_MAX 700

static const char *script =
  "local luamp = require 'luamp'\n"
  "local n, procs = %ld, %d\n"
  "local function f(x) return x * x end\n"
  "local pool = luamp.Pool(procs)\n"
  "pool:map(f, {1, 2, 3, 4})\n"
  "local items = luamp._core.table_new(n)\n"
  "for i = 1, n do items[i] = i end\n"
  "if n > 4 then\n"
  "  local r = pool:map(f, items)\n"
  "  assert(r[n] == n * n)\n"
  "end\n"
  "pool:close()\n"
  "pool:join()\n";

static char luamp_path[PATH_MAX];

/* The page faults of one run of the luamp program (and its workers) with a map of n
 * items on a Pool(procs); -1 on failure. The counter counts this process and every
 * descendant (inherit): a child's count joins it when the child exits. */
static long life(int counter, long n, int procs) {
  char code[1024];
  snprintf(code, sizeof code, script, n, procs);
  uint64_t before = 0, after = 0;
  if (read(counter, &before, sizeof before) != (ssize_t)sizeof before) return -1;
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    execl(luamp_path, "luamp", "-e", code, (char *)NULL);
    _exit(127);
  }
  int status;
  while (waitpid(pid, &status, 0) < 0) {}
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fprintf(stderr, "test_pool_faults: %s failed (status %d)\n", luamp_path, status);
    return -1;
  }
  if (read(counter, &after, sizeof after) != (ssize_t)sizeof after) return -1;
  return (long)(after - before);
}

static long median3(long a, long b, long c) {
  if (a > b) { long t = a; a = b; b = t; }
  if (b > c) b = c;
  return a > b ? a : b;
}

int main(void) {
  /* the luamp program is built beside this test */
  ssize_t k = readlink("/proc/self/exe", luamp_path, sizeof luamp_path - 8);
  if (k <= 0) return 1;
  luamp_path[k] = 0;
  char *slash = strrchr(luamp_path, '/');
  if (!slash) return 1;
  strcpy(slash + 1, "luamp");
  struct perf_event_attr attr;
  memset(&attr, 0, sizeof attr);
  attr.type = PERF_TYPE_SOFTWARE;
  attr.size = sizeof attr;
  attr.config = PERF_COUNT_SW_PAGE_FAULTS;
  attr.inherit = 1;
  int counter = (int)syscall(SYS_perf_event_open, &attr, 0, -1, -1, PERF_FLAG_FD_CLOEXEC);
  if (counter < 0) {
    printf("test_pool_faults: skipped (perf_event_open: this kernel does not let a process "
           "count its faults)\n");
    return 0;
  }
  int failures = 0;
  const int procs[2] = {2, 8};
  const long max[2] = {POOL2_MAX, POOL8_MAX};
  for (int p = 0; p < 2; p++) {
    long d[3];
    for (int i = 0; i < 3; i++) {
      long big = life(counter, N_ITEMS, procs[p]), small = life(counter, 4, procs[p]);
      if (big < 0 || small < 0) return 1;
      d[i] = big - small;
    }
    long m = median3(d[0], d[1], d[2]);
    printf("Pool(%d): map of %d items: %ld page faults beyond a map of 4 (budget %ld)\n",
           procs[p], N_ITEMS, m, max[p]);
#if !defined(__SANITIZE_ADDRESS__)
    /* (the sanitizer's shadow memory takes faults of its own: the counts mean nothing) */
    if (m > max[p]) failures++;
#endif
  }
  close(counter);
  return failures ? 1 : 0;
}
