/* test_queue_interrupt.c — a Ctrl-C that comes while a queue's get or put is under way
 * wins without moving an item. The luamp host's SIGINT handler marks the interrupt and
 * sets a hook that raises Interrupted at the next Lua event, which for a get under way
 * is its return: a get woken from its wait by the Ctrl-C that took an item anyway (one
 * the producer put meanwhile) lost it there, as did one that was spinning or waiting for
 * the lock. So a get or put that finds a Ctrl-C pending when it is about to take or add
 * its item raises Interrupted and leaves the queue as it was. Here the mark is set
 * directly (interrupt(), as an embedder's handler that only marks does), for small and
 * large items, blocking and not, with and without a maxsize. */
#include <stdio.h>

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
  "return table.concat(bad, '\\n')\n";

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "luamp", luaopen_luamp, 1);
  lua_pop(L, 1);
  lua_register(L, "interrupt", l_interrupt);
  if (luaL_dostring(L, script) != LUA_OK) {
    CHECK(0, "%s", luaL_tolstring(L, -1, NULL));
  } else {
    const char *bad = lua_tostring(L, -1);
    CHECK(bad && !*bad, "\n%s", bad ? bad : "?");
  }
  lua_close(L);
  return test_done("test_queue_interrupt");
}
