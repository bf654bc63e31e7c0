/* test_wait.c — the wait primitive: deadlines hold under a storm of signals, readiness
 * ends the wait early, and a pending interrupt ends it with -2. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include "internal.h"

#include "test_util.h"

static volatile sig_atomic_t ticks;
static void on_alarm(int sig) { (void)sig; ticks++; }

static void start_signal_storm(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_alarm;            /* no SA_RESTART: poll() gets EINTR */
  sigaction(SIGALRM, &sa, NULL);
  struct itimerval it = {{0, 2000}, {0, 2000}};
  setitimer(ITIMER_REAL, &it, NULL);
}

static void stop_signal_storm(void) {
  struct itimerval it = {{0, 0}, {0, 0}};
  setitimer(ITIMER_REAL, &it, NULL);
}

/* A wait proves something only if signals landed in it: a process that a loaded machine
 * leaves off its CPU for the whole wait sees the storm's expiries merged into one or two
 * signals. So the wait is tried again (each try checked) until one had its storm. */
static void test_deadline_survives_signals(void) {
  int stormed = 0;
  for (int try = 0; try < 50 && !stormed; try++) {
    ticks = 0;
    start_signal_storm();
    double t0 = luamp_now();
    int rc = luamp_wait_fds(NULL, 0, t0 + 0.2);
    double dt = luamp_now() - t0;
    stop_signal_storm();
    CHECK(rc == 0, "timeout should return 0, got %d", rc);
    CHECK(dt >= 0.2, "wait returned early after %.3f s", dt);
    CHECK(dt < 2.0, "wait overslept: %.3f s", dt);
    stormed = ticks > 5;
  }
  CHECK(stormed, "the signal storm did not happen in 50 waits (%d ticks in the last)", (int)ticks);
}

static void test_ready_fd_ends_wait(void) {
  int p[2];
  if (pipe2(p, O_CLOEXEC) < 0) { CHECK(0, "pipe2"); return; }
  struct pollfd pfd = {.fd = p[0], .events = POLLIN};
  CHECK(luamp_wait_fds(&pfd, 1, luamp_now() + 0.01) == 0, "empty pipe is not ready");
  if (write(p[1], "x", 1) != 1) CHECK(0, "write");
  double t0 = luamp_now();
  int rc = luamp_wait_fds(&pfd, 1, -1);
  CHECK(rc == 1 && (pfd.revents & POLLIN), "readable pipe should end the wait, rc=%d", rc);
  CHECK(luamp_now() - t0 < 1.0, "ready fd waited too long");
  close(p[0]);
  close(p[1]);
}

static void test_interrupt(void) {
  luamp_request_interrupt();
  CHECK(luamp_wait_fds(NULL, 0, -1) == -2, "a pending interrupt ends a wait with -2");
  CHECK(luamp_take_interrupt() == 1, "the interrupt stays pending until taken");
  CHECK(luamp_take_interrupt() == 0, "taking clears it");
}

int main(void) {
  test_deadline_survives_signals();
  test_ready_fd_ends_wait();
  test_interrupt();
  return test_done("test_wait");
}
