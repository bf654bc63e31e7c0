/*
 * interrupt.c — Ctrl-C for hosts that run Lua code on a user's behalf.
 *
 * The library installs no signal handler on its own. A host that wants Ctrl-C to stop
 * running code (the luamp program, the REPL, an embedder) makes the call through
 * luamp_pcall_interruptible(): only for the duration of that call is SIGINT caught.
 * When the signal comes the code is in one of two places, so the handler covers both:
 *  - running Lua: a hook is set that raises luamp.Interrupted at the next instruction
 *    (as lua.c does; lua_sethook is the one Lua call a signal handler may make);
 *  - blocked in a luamp wait (sleep, join, recv...): the pending-interrupt mark of
 *    wait.c makes luamp_wait_fds return, and the wait raises Interrupted.
 * One Ctrl-C is reported once: the hook raises only if the mark is still pending and
 * takes it; a wait that reported the Ctrl-C took the mark already, so the hook, when
 * it next fires, just removes itself.
 *
 * The handler has no SA_RESTART, so a blocking read in Lua's io library returns (with
 * EINTR) and the hook can fire. A SIGINT disposition of SIG_IGN inherited by the
 * process (a background job, nohup) is respected. There is no Lua binding.
 */
#include <signal.h>
#include <string.h>

#include "internal.h"

/* The state whose code the handler interrupts: the innermost call in progress. */
static lua_State *volatile interrupt_target;

static void interrupt_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  if (luamp_take_interrupt()) luamp_raise(L, "Interrupted", "interrupted!");
}

static void on_sigint(int sig) {
  (void)sig;
  luamp_request_interrupt();
  lua_State *L = interrupt_target;
  if (L) lua_sethook(L, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
  /* Lua code running in a task runs on the task's own thread (sched.c) */
  lua_State *T = luamp_sched_current_thread();
  if (T) lua_sethook(T, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

/* Installs on_sigint unless SIGINT is ignored; *old receives what to put back. Returns
 * whether anything was installed. */
static int catch_sigint(struct sigaction *old) {
  if (sigaction(SIGINT, NULL, old) < 0 || old->sa_handler == SIG_IGN) return 0;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  return sigaction(SIGINT, &sa, NULL) == 0;
}

int luamp_pcall_interruptible(lua_State *L, int nargs, int nresults, int msgh) {
  lua_State *outer = interrupt_target;
  /* A Ctrl-C that came while nothing was running is stale: it must not stop this call. */
  if (!outer) luamp_take_interrupt();
  interrupt_target = L;
  struct sigaction old;
  int installed = catch_sigint(&old);
  int status = lua_pcall(L, nargs, nresults, msgh);
  if (installed) sigaction(SIGINT, &old, NULL);
  interrupt_target = outer;
  /* One that came after the code finished is for nobody; a hook it left behind removes
   * itself when it finds no mark. */
  if (!outer) luamp_take_interrupt();
  return status;
}
