/* test_interrupt_items.c — a Ctrl-C that comes while a queue's get or put, or a Pipe's
 * receive, is under way wins without losing or moving an item. The luamp host's SIGINT
 * handler marks the interrupt and sets a hook that raises Interrupted at the next Lua
 * event, which for a call under way is its return: a get woken from its wait by the
 * Ctrl-C that took an item anyway (one the producer put meanwhile) lost it there, as did
 * one that was spinning or waiting for the lock, and so did a receive that read its
 * message. So a get or put that finds a Ctrl-C pending when it is about to take or add its
 * item raises Interrupted and leaves the queue as it was, a receive that finds one
 * pending keeps its message (whole, as the message under way) for the next receive, and
 * an acquire that finds one pending raises Interrupted before it takes the lock or unit.
 * Here the mark is set directly (interrupt(), as an embedder's handler that only marks
 * does), for small and large items, blocking and not, with and without a maxsize, and
 * at each point of a receive: before it starts, and while its message is read (this
 * program's recvmsg() and recv() stand in for libc's, the runtime being linked in
 * statically, and mark the Ctrl-C after a read when armed). */
#include <dlfcn.h>
#include <stdio.h>
#include <sys/socket.h>

#include <lualib.h>

#include "internal.h"
#include "luamp.h"
#include "test_util.h"

/* interrupt(): marks a Ctrl-C, as the host's SIGINT handler does */
static int l_interrupt(lua_State *L) {
  (void)L;
  luamp_request_interrupt();
  return 0;
}

/* what the next successful read does: 0 nothing, 1 mark a Ctrl-C after recvmsg (the
 * first record of a message), 2 after recv (the rest of a large one) */
static int arm;

ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
  static ssize_t (*real)(int, struct msghdr *, int);
  if (!real) real = (ssize_t (*)(int, struct msghdr *, int))dlsym(RTLD_NEXT, "recvmsg");
  ssize_t n = real(fd, msg, flags);
  if (n > 0 && arm == 1) { arm = 0; luamp_request_interrupt(); }
  return n;
}

ssize_t recv(int fd, void *buf, size_t len, int flags) {
  static ssize_t (*real)(int, void *, size_t, int);
  if (!real) real = (ssize_t (*)(int, void *, size_t, int))dlsym(RTLD_NEXT, "recv");
  ssize_t n = real(fd, buf, len, flags);
  if (n > 0 && arm == 2) { arm = 0; luamp_request_interrupt(); }
  return n;
}

/* interrupt_in_read(k): the next read of kind k (see arm) marks a Ctrl-C */
static int l_interrupt_in_read(lua_State *L) {
  arm = (int)luaL_checkinteger(L, 1);
  return 0;
}

static const char *const script =
  "local luamp = require 'luamp'\n"
  "local function interrupted(f, ...)\n"
  "  interrupt()\n"
  "  local ok, err = pcall(f, ...)\n"
  "  return not ok and type(err) == 'table' and err.kind == 'Interrupted', ok and err or tostring(err)\n"
  "end\n"
  "local bad = {}\n"
  "for _, maxsize in ipairs({0, 2}) do\n"
  "  for _, item in ipairs({'small', string.rep('L', 1 << 20)}) do\n"
  "    local q = luamp.Queue(maxsize)\n"
  "    local what = ('maxsize %d, item of %d bytes'):format(maxsize, #item)\n"
  "    q:put(item)\n"
  "    for _, get in ipairs({{'get', q.get}, {'get(false)', function(q) return q:get(false) end},\n"
  "                          {'get_nowait', q.get_nowait}, {'get(true, 1)', function(q) return q:get(true, 1) end}}) do\n"
  "      local ok, got = interrupted(get[2], q)\n"
  "      if not ok then bad[#bad + 1] = what .. ': ' .. get[1] .. ' with a Ctrl-C pending returned ' .. tostring(got and #got) end\n"
  "      if q:qsize() ~= 1 then bad[#bad + 1] = what .. ': ' .. get[1] .. ' took the item'; q:put(item) end\n"
  "    end\n"
  "    local ok, got = interrupted(q.put, q, item)\n"
  "    if not ok then bad[#bad + 1] = what .. ': put with a Ctrl-C pending returned' end\n"
  "    if q:qsize() ~= 1 then bad[#bad + 1] = what .. ': put added the item anyway' end\n"
  "    if q:get() ~= item then bad[#bad + 1] = what .. ': the item changed' end\n"
  "    if not q:empty() then bad[#bad + 1] = what .. ': the queue is not empty at the end' end\n"
  "  end\n"
  "end\n"
  "local a, b = luamp.Pipe()\n"
  "local r, w = luamp.Pipe(false)\n"
  "local function mid(k) return function(f, ...) interrupt_in_read(k); return f(...) end end\n"
  "for _, msg in ipairs({'small', string.rep('P', 200000)}) do\n"
  "  local function before(f, ...) interrupt(); return f(...) end\n"
  "  for _, when in ipairs({{'before the receive', before}, {'while the message is read', mid(#msg > 1000 and 2 or 1)}}) do\n"
  "  local what = ('a message of %d bytes, Ctrl-C %s'):format(#msg, when[1])\n"
  "  for _, recv in ipairs({{'recv', b.recv}, {'recv_bytes', b.recv_bytes}, {'poll + recv', function(c) assert(c:poll(1)); return c:recv() end},\n"
  "                          {'wait + recv', function(c) assert(#luamp.wait({c}, 5) == 1); return c:recv() end}}) do\n"
  "    local m = recv[1] == 'recv_bytes' and luamp.dumps(msg) or msg\n"
  "    a:send(msg)\n"
  "    local ok, got = pcall(when[2], recv[2], b)\n"
  "    ok = not ok and type(got) == 'table' and got.kind == 'Interrupted'\n"
  "    interrupt_in_read(0)\n"
  "    if not ok then bad[#bad + 1] = what .. ': ' .. recv[1] .. ' with a Ctrl-C pending returned' end\n"
  "    local ok2, again = pcall(recv[2], b)\n"
  "    if not ok2 or again ~= m then bad[#bad + 1] = what .. ': ' .. recv[1] .. ' after the Ctrl-C got ' .. (ok2 and ('%d bytes'):format(#tostring(again)) or tostring(again):sub(1, 200)) end\n"
  "    if b:poll() then bad[#bad + 1] = what .. ': something left after ' .. recv[1] end\n"
  "    pcall(luamp.sleep, 0)   -- (takes a Ctrl-C left pending)\n"
  "  end\n"
  "  end\n"
  "end\n"
  /* a message with descriptors: they stay with it */
  "a:send({msg = 'fds', w = w})\n"
  "local ok = interrupted(b.recv, b)\n"
  "if not ok then bad[#bad + 1] = 'a message with a descriptor: recv with a Ctrl-C pending returned' end\n"
  "local okf, m = pcall(b.recv, b)\n"
  "if not okf or type(m) ~= 'table' or m.msg ~= 'fds' then bad[#bad + 1] = 'a message with a descriptor: lost: ' .. tostring(m):sub(1, 200)\n"
  "else m.w:send('through'); if r:recv() ~= 'through' then bad[#bad + 1] = 'its descriptor does not work' end end\n"
  /* a Lock, RLock or Semaphore: an acquire that raises Interrupted has taken nothing */
  "for _, kind in ipairs({'Lock', 'RLock', 'Semaphore', 'BoundedSemaphore'}) do\n"
  "  local l = luamp[kind]()\n"
  "  for _, how in ipairs({{'acquire()', function() return l:acquire() end}, {'acquire(true, 1)', function() return l:acquire(true, 1) end},\n"
  "                        {'acquire(false)', function() return l:acquire(false) end}, {'with', function() return l:with(function() end) end}}) do\n"
  "    local ok = interrupted(how[2])\n"
  "    if not ok then bad[#bad + 1] = kind .. ': ' .. how[1] .. ' with a Ctrl-C pending returned'; pcall(l.release, l) end\n"
  "    if not l:acquire(false) then bad[#bad + 1] = kind .. ': ' .. how[1] .. ' with a Ctrl-C pending left it taken'\n"
  "    else l:release() end\n"
  "    if kind:find('Semaphore') and l:get_value() ~= 1 then bad[#bad + 1] = kind .. ': value ' .. l:get_value() .. ' after ' .. how[1] end\n"
  "  end\n"
  "end\n"
  "return table.concat(bad, '\\n')\n";

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  lua_register(L, "interrupt", l_interrupt);
  lua_register(L, "interrupt_in_read", l_interrupt_in_read);
  if (luaL_dostring(L, script) != LUA_OK) {
    CHECK(0, "%s", luaL_tolstring(L, -1, NULL));
  } else {
    const char *bad = lua_tostring(L, -1);
    CHECK(bad && !*bad, "\n%s", bad ? bad : "?");
  }
  lua_close(L);
  return test_done("test_interrupt_items");
}
