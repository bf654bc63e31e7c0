-- luamp.manager: Manager() and BaseManager — a server process owning objects, and proxies
-- that call them from any process, on this machine or another.
--
-- Wire and security are runtime/auth.c: a mutual challenge-response on the authkey, then
-- every frame sealed with a per-direction session key. This file has the two ends:
--
--  * The server (serve) is one loop over all its connections (never one blocking read):
--    each request runs in a coroutine, so a call that must wait (q:get on an empty queue,
--    lock:acquire, ev:wait) parks only its own connection while the loop serves others.
--    Requests are {id, method, nargs, args...}; replies {true, nres, results...} or
--    {false, error fields} (plain ones travel as vectors of values, see auth.c: a
--    request that finds its connection idle runs from those values, no table made). An
--    error raised by an object keeps its luamp kind; any other error comes back as
--    Remote with the server's traceback. Id 0 is the manager itself
--    (create, shutdown, ping, and the _session, _rel, _pin of freeing below).
--  * Proxies hold (address, authkey, id) and call through one connection per process and
--    manager, made on first use (after a fork, the child makes its own). They cross the
--    codec as handles carrying that triple, so they work in any process that receives
--    them. A transport failure or an interrupted call closes the connection (a reply
--    might still be in flight) and the next call reconnects.
--
-- Freeing. An object is freed (its id's entry dropped) when the process that made it has
-- let go of every proxy to it, unless it may be used elsewhere; a wrong "no object" on a
-- live proxy is far worse than a leak, so when in doubt the object is kept:
--  * Each client process opens a session at a manager on its first create: a connection
--    of its own that makes no calls, so that no interrupted or failed call ever closes
--    it. The session owns the objects its process creates (each create makes a new id,
--    so an id has one owner: a registered typeid that hands out the same object twice
--    gives two ids, each freed alone, and freeing an id drops only its entry).
--  * A proxy made by create is its process's own. When it is collected (__gc, which does
--    no I/O: it may run in the middle of any call) its id is queued, and the queue rides
--    on this process's next request to that manager (_rel, see call_releasing). The
--    server frees an id only at the word of the session that owns it (any other release,
--    forged or stale, is ignored): no process but the owner can free an object.
--  * Pinned: when any process encodes a proxy (to a Queue, Pipe, Pool task, spawn
--    child, another manager object) the server is told first, in a call that returns
--    before the bytes can leave (_pin), and never frees the object. So a handle in
--    flight, or in a process that got one, always finds its object, even after its
--    owner exited. A proxy rebuilt from a handle is known pinned (its sender pinned it).
--    A pin that cannot reach the manager fails the encoding (the handle does not leave).
--  * Fork: a child has copies of its parent's proxies without any encoding. The parent
--    never releases a proxy made before its latest fork (core.auth_forks, counted by a
--    fork hook), and the child keeps the parent's session connection open until it
--    exits (inherited_sessions), so the objects its parent made live at least as long as
--    the child, whatever the parent does or however it dies. (A fork made outside
--    luamp, a library's raw fork(), runs no hook and is not counted: a child made so
--    must get its proxies by handle, as a spawn child does.)
--  * When a session's connection closes (its process and every fork child holding it
--    exited, or were killed), the server frees the objects the session still owns:
--    made by that process, never pinned, so no other process can know their ids.
-- Pinning needs only the one message, from whichever process encodes: releases and the
-- end of a session free only owned objects, and a pin takes the object from its owner
-- before any other process can hold it.
local core = require "luamp._core"
local U = require "luamp.util"
local process = require "luamp.process"

local raise = U.raise
local interrupted = U.interrupted
local pack, unpack = table.pack, table.unpack
local mtype = math.type

local M = {}

local HANDSHAKE_TIMEOUT = 10     -- a server drops a peer that has not authenticated by then

-- ---- addresses and authkeys -------------------------------------------------------------

local function check_address(what, a)
  if type(a) == "string" then
    if #a == 0 or #a > 107 then raise("Value", what .. ": a socket path must have 1 to 107 bytes") end
    return a
  end
  if type(a) == "table" and type(a[1]) == "string" and math.type(a[2]) == "integer" then
    if a[2] < 0 or a[2] > 65535 then raise("Value", what .. ": bad port " .. a[2]) end
    return {a[1], a[2]}
  end
  raise("Value", what .. ": address must be {host, port} or a socket path")
end

local function address_key(a)
  if type(a) == "string" then return a end
  return a[1] .. ":" .. a[2]
end

local function default_authkey()
  return process.current_process().authkey
end

local function check_authkey(what, k)
  if k == nil then return default_authkey() end
  if type(k) ~= "string" then raise("Value", what .. ": authkey must be a string") end
  return k
end

-- ---- client side: connections and calls ------------------------------------------------

-- address key -> {pid =, free = {ch, ...}}: this process's idle connections to each
-- manager. A call takes one for its duration and gives it back, so that calls made at
-- once by several tasks (luamp.task) each have a connection of their own; a program
-- without tasks keeps using one.
local connections = {}

local function connect_channel(address, authkey, timeout)
  local ch
  if type(address) == "string" then
    ch = core.auth_connect(address, nil, timeout)
  else
    ch = core.auth_connect(address[1], address[2], timeout)
  end
  local ok, err = pcall(ch.handshake, ch, authkey, HANDSHAKE_TIMEOUT)
  if not ok then
    ch:close()
    error(err, 0)
  end
  return ch
end

local function take_channel(ref)
  local c = connections[ref.key]
  local pid = core.getpid()
  if not c or c.pid ~= pid then
    c = {pid = pid, free = {}}
    connections[ref.key] = c
  end
  local free = c.free
  local n = #free
  local ch = free[n]
  if ch then
    free[n] = nil
    return ch
  end
  return connect_channel(ref.address, ref.authkey)
end

local function give_back(ref, ch)
  local c = connections[ref.key]
  if c and c.pid == core.getpid() then c.free[#c.free + 1] = ch else ch:close() end
end

local function drop_connection(key)
  local c = connections[key]
  if c then
    connections[key] = nil
    if c.pid == core.getpid() then
      for _, ch in ipairs(c.free) do ch:close() end
    end
  end
end

local function raise_reply(info)
  if type(info) ~= "table" or type(info.kind) ~= "string" or core.errors[info.kind] == nil then
    raise("Remote", "malformed error from the manager")
  end
  local fields = {}
  for k, v in pairs(info) do
    if k ~= "kind" and k ~= "message" then fields[k] = v end
  end
  raise(info.kind, tostring(info.message), fields)
end

-- The end of a call: ch:request's outcome (under pcall). A reply of plain results comes
-- as true, results...; any other as the table {true, n, results...} or {false, error}.
local function finish_call(ref, ch, ok, reply, ...)
  if not ok then
    -- Interrupted, EOF, a broken socket: the connection's state is unknown, close it
    ch:close()
    error(reply, 0)
  end
  give_back(ref, ch)
  if reply == true then return ... end
  if type(reply) ~= "table" then raise("Remote", "malformed reply from the manager") end
  if reply[1] == true then return unpack(reply, 3, 2 + (reply[2] or 0)) end
  raise_reply(reply[2])
end

-- ---- client side: sessions, releases and pins (see "Freeing" in the header) -------------

local getpid, forks_made = core.getpid, core.auth_forks

-- address key -> {pid =, ch =, token =, rel = {id, ...}}: this process's session at each
-- manager, held by a connection of its own that makes no calls (so no interrupted call
-- ever closes it), and the releases of its objects not sent yet. A proxy names the
-- session that made it, so a release never goes to a later session (a new manager at a
-- reused port), which might own an object of the same id.
local sessions = {}
-- Sessions a fork child inherited: kept (never collected, so never closed) until it
-- exits, which keeps its parent's session, and the objects the parent made before the
-- fork, alive at the server while the child may use them.
local inherited_sessions = {}

local REL_BATCH = 200     -- releases carried by one request (a request vector holds 250 values)
local rel_waiting = false -- whether some session of this process has releases to send

-- this process's session at ref's manager (opened now if it has none)
local function session(ref)
  local key, pid = ref.key, getpid()
  local sess = sessions[key]
  if sess and sess.pid == pid then return sess end
  if sess then inherited_sessions[#inherited_sessions + 1] = sess end
  sessions[key] = nil
  local ch = connect_channel(ref.address, ref.authkey)
  local ok, got, token = pcall(ch.request, ch, 0, "_session")
  if not ok or got ~= true or type(token) ~= "string" then
    ch:close()
    if not ok then error(got, 0) end
    raise("Remote", "malformed session reply from the manager")
  end
  sess = {pid = pid, ch = ch, token = token, rel = {}}
  sessions[key] = sess
  return sess
end

-- closes this process's session at a manager that has stopped (its server was ours)
local function drop_session(key)
  local sess = sessions[key]
  if sess and sess.pid == getpid() then
    sessions[key] = nil
    sess.ch:close()
  end
end

local function releases_waiting(pid)
  for _, sess in pairs(sessions) do
    if sess.pid == pid and sess.rel[1] then return true end
  end
  return false
end

local function finish_releasing(ref, ch, rel, req, k, ok, ...)
  if not ok then
    for i = 1, k do rel[#rel + 1] = req[4 + i] end
    rel_waiting = true
  end
  return finish_call(ref, ch, ok, ...)
end

-- The request carries up to REL_BATCH queued releases before its own id, method and
-- arguments: {0, "_rel", token, k, id1..idk, id, method, args...}. A transport failure
-- puts them back (releasing twice is harmless: the server ignores what the session no
-- longer owns, and ids are never reused).
local function call_releasing(ref, id, method, ...)
  local pid = getpid()
  local sess = sessions[ref.key]
  local rel = sess and sess.pid == pid and sess.rel
  if not (rel and rel[1]) then
    rel_waiting = releases_waiting(pid)
    local ch = take_channel(ref)
    return finish_call(ref, ch, pcall(ch.request, ch, id, method, ...))
  end
  local ch = take_channel(ref)
  local nq = #rel
  local k = nq < REL_BATCH and nq or REL_BATCH
  local nargs = select("#", ...)
  local req = {0, "_rel", sess.token, k}
  for i = 1, k do
    req[4 + i] = rel[nq - k + i]
    rel[nq - k + i] = nil
  end
  req[5 + k], req[6 + k] = id, method
  for i = 1, nargs do req[6 + k + i] = (select(i, ...)) end
  rel_waiting = releases_waiting(pid)
  return finish_releasing(ref, ch, rel, req, k, pcall(ch.request, ch, unpack(req, 1, 6 + k + nargs)))
end

-- call(ref, id, method, ...) -> the results of method on object id at the manager
local function call(ref, id, method, ...)
  if rel_waiting then return call_releasing(ref, id, method, ...) end
  local ch = take_channel(ref)
  return finish_call(ref, ch, pcall(ch.request, ch, id, method, ...))
end

-- ---- proxies ---------------------------------------------------------------------------

-- proxy -> {ref =, id =, typeid =, kind =, exposed = set or nil, owner = pid that made it
-- (nil for a proxy rebuilt from a handle), sess = the session that made it, forks =
-- forks_made() then, pinned = true once the server knows the object is never released}
local S = setmetatable({}, {__mode = "k"})

local pin_own_object     -- set by a serving process: pins an object of its own, no call

-- A proxy about to leave this process (its handle is being encoded): unless the server
-- already knows, tell it, and wait for its answer, that the object is pinned. This runs
-- before the encoded bytes can reach anyone, so no process ever holds a handle to an
-- object its owner may still release (or whose owner's exit may free it).
local function pin(s)
  if pin_own_object and pin_own_object(s) then
    s.pinned = true
    return
  end
  call(s.ref, 0, "_pin", s.id)
  s.pinned = true
end

-- __gc of every proxy: queues the release of an object this process made, never shared
-- (not pinned) and made since this process last forked (an older one has a copy in a
-- child). No I/O here: a collection can run in the middle of any call, this process's
-- manager calls included; the release goes with the next request to that manager.
local function proxy_gc(p)
  local s = S[p]
  if not s or s.pinned or s.owner == nil or s.owner ~= getpid() or s.forks ~= forks_made() then
    return
  end
  local sess = s.sess
  if sessions[s.ref.key] ~= sess then return end   -- its manager is gone
  local rel = sess.rel
  rel[#rel + 1] = s.id
  rel_waiting = true
end

local function state(p)
  local s = S[p]
  if not s then raise("Value", "not a manager proxy") end
  return s
end

local function remote(p, method, ...)
  local s = state(p)
  return call(s.ref, s.id, method, ...)
end

local function method_fn(name)
  return function(self, ...) return remote(self, name, ...) end
end

local kinds = {}       -- kind -> metatable
local method_cache = {}

local function get_method(name)
  local f = method_cache[name]
  if not f then
    f = method_fn(name)
    method_cache[name] = f
  end
  return f
end

local function proxy_tostring(self)
  local s = S[self]
  return string.format("<%sProxy typeid=%s id=%d at %s>", s.kind, s.typeid, s.id, s.ref.key)
end

local function proxy_handle(self)
  local s = S[self]
  if not s.pinned then pin(s) end
  local ex
  if s.exposed then
    ex = {}
    for k in pairs(s.exposed) do ex[#ex + 1] = k end
  end
  return "luamp.Proxy", {address = s.ref.address, authkey = s.ref.authkey, id = s.id,
    typeid = s.typeid, kind = s.kind, exposed = ex}
end

local function new_kind(name, methods, extra)
  local mt = {
    __name = "luamp." .. name .. "Proxy",
    __tostring = proxy_tostring,
    __luamp_handle = proxy_handle,
    __gc = proxy_gc,
  }
  for k, v in pairs(extra or {}) do mt[k] = v end
  local own = {}
  for _, m in ipairs(methods) do own[m] = get_method(m) end
  mt.methods = own
  if not mt.__index then
    mt.__index = function(self, k)
      local f = own[k]
      if f then return f end
      local s = S[self]
      if type(k) ~= "string" or k:sub(1, 1) == "_" then return nil end
      if s.exposed == nil or s.exposed[k] then return get_method(k) end
      return function()
        raise("Value", string.format("method '%s' of %s is not exposed", k, s.typeid))
      end
    end
  end
  kinds[name] = mt
  return mt
end

-- lock helpers, as on luamp's own locks
local function with(self, fn, ...)
  self:acquire()
  local r = pack(xpcall(fn, debug.traceback, ...))
  self:release()
  if not r[1] then error(r[2], 0) end
  return unpack(r, 2, r.n)
end
local guard_mt = {__close = function(g) g.lock:release() end}
local function guard(self)
  self:acquire()
  return setmetatable({lock = self}, guard_mt)
end

-- dict: d[k], d[k] = v (nil deletes), #d, pairs(d), and methods
local dict_methods = {"get", "keys", "values", "items", "update", "pop", "popitem", "clear",
  "copy", "setdefault", "totable", "has"}
do
  local own = {}
  for _, m in ipairs(dict_methods) do own[m] = get_method(m) end
  new_kind("Dict", dict_methods, {
    __index = function(self, k)
      local f = own[k]
      if f then return f end
      return remote(self, "__getitem", k)
    end,
    __newindex = function(self, k, v) remote(self, "__setitem", k, v) end,
    __len = function(self) return remote(self, "__len") end,
    __pairs = function(self)
      local items, i = remote(self, "items"), 0
      return function()
        i = i + 1
        local kv = items[i]
        if kv then return kv[1], kv[2] end
      end, self, nil
    end,
  })
end

-- list and Array: l[i] (1-based), l[i] = v, #l, ipairs, and methods
local function sequence_kind(name, methods)
  local own = {}
  for _, m in ipairs(methods) do own[m] = get_method(m) end
  new_kind(name, methods, {
    __index = function(self, k)
      local f = own[k]
      if f then return f end
      if type(k) == "string" then return nil end
      return remote(self, "__getitem", k)
    end,
    __newindex = function(self, k, v) remote(self, "__setitem", k, v) end,
    __len = function(self) return remote(self, "__len") end,
    __pairs = function(self)
      local t, i = remote(self, "totable"), 0
      return function()
        i = i + 1
        if i <= t.n then return i, t[i] end
      end, self, nil
    end,
  })
end
sequence_kind("List", {"append", "extend", "insert", "pop", "remove", "totable", "reverse",
  "index", "count", "clear", "sort"})
sequence_kind("Array", {"totable", "get_lock"})

-- Namespace: ns.x, ns.x = v
new_kind("Namespace", {}, {
  __index = function(self, k)
    if k == "totable" then return get_method("totable") end
    return remote(self, "__getattr", k)
  end,
  __newindex = function(self, k, v) remote(self, "__setattr", k, v) end,
  __pairs = function(self) return next, remote(self, "totable"), nil end,
})

-- Value: v.value, v.value = x, v:get(), v:set(x)
do
  local get, set = get_method("get"), get_method("set")
  new_kind("Value", {"get", "set"}, {
    __index = function(self, k)
      if k == "value" then return remote(self, "get") end
      if k == "get" then return get end
      if k == "set" then return set end
      if k == "get_lock" then return function() raise("Value", "a manager Value has no lock") end end
      return nil
    end,
    __newindex = function(self, k, v)
      if k ~= "value" then raise("Value", "cannot set " .. tostring(k) .. " on a Value proxy") end
      remote(self, "set", v)
    end,
  })
end

-- queues
new_kind("Queue", {"get", "put", "get_nowait", "put_nowait", "qsize", "empty", "full",
  "task_done", "join"})

-- locks and semaphores: acquire/release plus with and guard
for _, name in ipairs({"Lock", "Semaphore"}) do
  local mt = new_kind(name, {"acquire", "release", "locked", "get_value"})
  mt.methods.with = with
  mt.methods.guard = guard
end

new_kind("Event", {"set", "clear", "is_set", "wait"})

do
  local mt = new_kind("Condition", {"acquire", "release", "wait", "notify", "notify_all"})
  mt.methods.with = with
  mt.methods.guard = guard
  -- wait_for runs the predicate here, between waits, as Python's proxy does
  mt.methods.wait_for = function(self, pred, timeout)
    U.check_timeout("wait_for", timeout)
    local deadline = timeout and core.time() + timeout
    local r = pred()
    while not r do
      local left
      if deadline then
        left = deadline - core.time()
        if left <= 0 then break end
      end
      self:wait(left)
      r = pred()
    end
    return r
  end
end

do
  local own = {}
  for _, m in ipairs({"wait", "abort", "reset"}) do own[m] = get_method(m) end
  new_kind("Barrier", {"wait", "abort", "reset"}, {
    __index = function(self, k)
      local f = own[k]
      if f then return f end
      if k == "parties" or k == "n_waiting" or k == "broken" then return remote(self, "__getattr", k) end
      return nil
    end,
  })
end

new_kind("Auto", {})

-- make_proxy(ref, id, typeid, kind, exposed, sess): sess is this process's session for
-- a proxy it just created (create's answer), nil for one rebuilt from a handle
local function make_proxy(ref, id, typeid, kind, exposed, sess)
  local mt = kinds[kind] or kinds.Auto
  local ex
  if exposed then
    ex = {}
    for _, m in ipairs(exposed) do ex[m] = true end
  end
  local p = setmetatable({}, mt)
  S[p] = {ref = ref, id = id, typeid = typeid, kind = kinds[kind] and kind or "Auto", exposed = ex,
    owner = sess and sess.pid, sess = sess, forks = sess and forks_made(), pinned = sess == nil}
  return p
end

local function make_ref(address, authkey)
  return {address = address, authkey = authkey, key = address_key(address)}
end

core.register_handle("luamp.Proxy", function(p)
  if type(p) ~= "table" or math.type(p.id) ~= "integer" or type(p.authkey) ~= "string"
     or type(p.typeid) ~= "string" or type(p.kind) ~= "string" then
    raise("Value", "malformed manager proxy")
  end
  local addr = check_address("proxy", p.address)
  local ex = p.exposed
  if ex ~= nil and type(ex) ~= "table" then raise("Value", "malformed manager proxy") end
  return make_proxy(make_ref(addr, p.authkey), p.id, p.typeid, p.kind, ex)
end)

-- ---- server side: the objects ------------------------------------------------------------

-- The scheduler of one serving process: parked coroutines, woken by notify or deadlines.
local Sched = {}
Sched.__index = Sched

local function new_sched()
  return setmetatable({runnable = {}, timed = {}, fdwait = {}}, Sched)
end

local sched          -- the serving process's scheduler (one per process that serves)
local current_conn   -- the connection whose request is running

-- Parks the running request until notified through waitq (a list) or the deadline.
-- Returns true when notified, false at the deadline.
local function park(waitq, deadline)
  local w = {co = coroutine.running(), q = waitq, deadline = deadline, conn = current_conn}
  if waitq then waitq[#waitq + 1] = w end
  if deadline then sched.timed[w] = true end
  current_conn.waiting = w
  return coroutine.yield(w)
end

-- Parks until fd is readable or the deadline.
local function park_fd(fd, deadline)
  local w = {co = coroutine.running(), deadline = deadline, conn = current_conn, fd = fd}
  sched.fdwait[w] = true
  if deadline then sched.timed[w] = true end
  current_conn.waiting = w
  return coroutine.yield(w)
end

local function unpark(w)
  if w.q then
    for i = 1, #w.q do
      if w.q[i] == w then table.remove(w.q, i) break end
    end
  end
  sched.timed[w] = nil
  sched.fdwait[w] = nil
  if w.conn.waiting == w then w.conn.waiting = nil end
end

local function wake(w, value)
  unpark(w)
  local r = sched.runnable
  r[#r + 1] = {w, value}
end

local function notify(waitq, n)
  while #waitq > 0 and (n == nil or n > 0) do
    wake(waitq[1], true)
    if n then n = n - 1 end
  end
end

local function deadline_of(timeout, what)
  if timeout == nil then return nil end
  if type(timeout) ~= "number" or timeout ~= timeout then
    raise("Value", what .. ": timeout must be a number of seconds or nil")
  end
  if timeout == math.huge then return nil end
  return core.time() + math.max(timeout, 0)
end

-- blocking(block, timeout) as Python's get/put/acquire take them
local function block_deadline(block, timeout, what)
  if block == false then return false end
  return deadline_of(timeout, what)
end

local T = {}   -- typeid -> {new = function(...) -> obj, kind = proxy kind, methods = class}

local function class(typeid, kind, methods, new)
  methods.__index = methods
  T[typeid] = {kind = kind, class = methods, new = function(...)
    return setmetatable(new(...), methods)
  end}
  return methods
end

-- A Lua table's keys have no order: a table's keys enter a dict sorted (numbers, then
-- strings, then the rest), so the order is the same every run.
local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta < tb end
    if ta == "number" or ta == "string" then return a < b end
    return false
  end)
  return keys
end

-- dict, with insertion order as Python keeps it
local Dict = class("dict", "Dict", {}, function(init)
  local d = {data = {}, order = {}, pos = {}, n = 0, holes = 0}
  if init ~= nil then
    if type(init) ~= "table" then raise("Value", "dict: expected a table") end
    for _, k in ipairs(sorted_keys(init)) do
      d.order[#d.order + 1] = k
      d.pos[k] = #d.order
      d.data[k] = init[k]
      d.n = d.n + 1
    end
  end
  return d
end)

-- order lists keys as inserted; a deleted key leaves `false` there until compaction
local function dict_set(d, k, v)
  if k == nil or k ~= k then raise("Value", "dict key must not be nil or NaN") end
  if v == nil then
    if d.data[k] ~= nil then
      d.data[k] = nil
      d.order[d.pos[k]] = false
      d.pos[k] = nil
      d.n = d.n - 1
      d.holes = d.holes + 1
      if d.holes > 32 and d.holes > d.n then
        local order, pos = {}, {}
        for _, key in ipairs(d.order) do
          if key ~= false then order[#order + 1] = key; pos[key] = #order end
        end
        d.order, d.pos, d.holes = order, pos, 0
      end
    end
    return
  end
  if d.data[k] == nil then
    local i = #d.order + 1
    d.order[i] = k
    d.pos[k] = i
    d.n = d.n + 1
  end
  d.data[k] = v
end

local function dict_each(d, fn)
  for _, k in ipairs(d.order) do
    if k ~= false then fn(k, d.data[k]) end
  end
end

function Dict:__getitem(k) return self.data[k] end
function Dict:__setitem(k, v) dict_set(self, k, v) end
function Dict:__len() return self.n end
function Dict:get(k, default)
  local v = self.data[k]
  if v == nil then return default end
  return v
end
function Dict:has(k) return self.data[k] ~= nil end
function Dict:keys()
  local t = {}
  dict_each(self, function(k) t[#t + 1] = k end)
  return t
end
function Dict:values()
  local t = {}
  dict_each(self, function(_, v) t[#t + 1] = v end)
  return t
end
function Dict:items()
  local t = {}
  dict_each(self, function(k, v) t[#t + 1] = {k, v} end)
  return t
end
function Dict:totable()
  local t = {}
  dict_each(self, function(k, v) t[k] = v end)
  return t
end
Dict.copy = Dict.totable
function Dict:update(t)
  if type(t) ~= "table" then raise("Value", "update: expected a table") end
  for _, k in ipairs(sorted_keys(t)) do dict_set(self, k, t[k]) end
end
function Dict:pop(...)
  local n = select("#", ...)
  local k, default = ...
  local v = self.data[k]
  if v == nil then
    if n >= 2 then return default end
    raise("Value", "pop: key not found: " .. tostring(k))
  end
  dict_set(self, k, nil)
  return v
end
function Dict:popitem()
  for i = #self.order, 1, -1 do
    local k = self.order[i]
    if k ~= false then
      local v = self.data[k]
      dict_set(self, k, nil)
      return k, v
    end
  end
  raise("Value", "popitem: dictionary is empty")
end
function Dict:clear()
  self.data, self.order, self.pos, self.n, self.holes = {}, {}, {}, 0, 0
end
function Dict:setdefault(k, default)
  local v = self.data[k]
  if v == nil then
    dict_set(self, k, default)
    return default
  end
  return v
end

-- list: 1-based, may hold nil (its length is kept)
local List = class("list", "List", {}, function(init)
  if init ~= nil and type(init) ~= "table" then raise("Value", "list: expected a table") end
  local t, n = {}, 0
  if init then
    n = init.n or #init
    for i = 1, n do t[i] = init[i] end
  end
  return {t = t, n = n}
end)

local function index_arg(self, i, what, allow_end)
  if math.type(i) ~= "integer" then
    if type(i) == "number" and i == math.floor(i) then i = math.tointeger(i)
    else raise("Value", what .. ": index must be an integer") end
  end
  if i < 0 then i = self.n + 1 + i end
  if i < 1 or i > self.n + (allow_end and 1 or 0) then return nil end
  return i
end

function List:__getitem(i)
  i = index_arg(self, i, "list index")
  if i then return self.t[i] end
end
function List:__setitem(i, v)
  local j = index_arg(self, i, "list index", true)
  if not j then raise("Value", "list assignment index out of range: " .. tostring(i)) end
  self.t[j] = v
  if j > self.n then self.n = j end
end
function List:__len() return self.n end
function List:append(v)
  self.n = self.n + 1
  self.t[self.n] = v
end
function List:extend(t)
  if type(t) ~= "table" then raise("Value", "extend: expected a table") end
  for i = 1, t.n or #t do self:append(t[i]) end
end
function List:insert(i, v)
  local j = index_arg(self, i, "insert", true)
  if not j then j = i < 1 and 1 or self.n + 1 end
  table.move(self.t, j, self.n, j + 1)
  self.t[j] = v
  self.n = self.n + 1
end
function List:pop(i)
  if self.n == 0 then raise("Value", "pop from an empty list") end
  local j = i == nil and self.n or index_arg(self, i, "pop")
  if not j then raise("Value", "pop index out of range") end
  local v = self.t[j]
  table.move(self.t, j + 1, self.n, j)
  self.t[self.n] = nil
  self.n = self.n - 1
  return v
end
function List:index(v)
  for i = 1, self.n do
    if self.t[i] == v then return i end
  end
  raise("Value", "index: value is not in the list: " .. tostring(v))
end
function List:remove(v)
  self:pop(self:index(v))
end
function List:count(v)
  local c = 0
  for i = 1, self.n do
    if self.t[i] == v then c = c + 1 end
  end
  return c
end
function List:reverse()
  local t, n = self.t, self.n
  for i = 1, n // 2 do t[i], t[n + 1 - i] = t[n + 1 - i], t[i] end
end
function List:sort(cmp)
  table.sort(self.t, cmp)
end
function List:clear() self.t, self.n = {}, 0 end
function List:totable()
  return table.move(self.t, 1, self.n, 1, {n = self.n})
end

-- Array(typecode, init): a list of fixed length
local Array = class("Array", "Array", {}, function(tc, init)
  if type(tc) ~= "string" then raise("Value", "Array: typecode must be a string") end
  local t, n = {}, 0
  if math.type(init) == "integer" then
    n = init
    for i = 1, n do t[i] = 0 end
  elseif type(init) == "table" then
    n = init.n or #init
    for i = 1, n do t[i] = init[i] end
  else
    raise("Value", "Array: expected a size or a table")
  end
  return {t = t, n = n, typecode = tc}
end)
Array.__getitem = List.__getitem
function Array:__setitem(i, v)
  local j = index_arg(self, i, "Array index")
  if not j then raise("Value", "Array index out of range: " .. tostring(i)) end
  self.t[j] = v
end
Array.__len = List.__len
Array.totable = List.totable

-- Namespace
local Namespace = class("Namespace", "Namespace", {}, function(init)
  local t = {}
  if type(init) == "table" then for k, v in pairs(init) do t[k] = v end end
  return {t = t}
end)
function Namespace:__getattr(k) return self.t[k] end
function Namespace:__setattr(k, v) self.t[k] = v end
function Namespace:totable()
  local t = {}
  for k, v in pairs(self.t) do t[k] = v end
  return t
end

-- Value(typecode, v)
local Value = class("Value", "Value", {}, function(tc, v)
  if type(tc) ~= "string" then raise("Value", "Value: typecode must be a string") end
  return {typecode = tc, v = v}
end)
function Value:get() return self.v end
function Value:set(v) self.v = v end

-- Queue and JoinableQueue
local Queue = class("Queue", "Queue", {}, function(maxsize)
  if type(maxsize) == "table" then maxsize = maxsize.maxsize end
  if maxsize ~= nil and math.type(maxsize) ~= "integer" then raise("Value", "Queue: maxsize must be an integer") end
  return {items = {}, head = 1, tail = 0, maxsize = maxsize and maxsize > 0 and maxsize or 0,
    getters = {}, putters = {}, joiners = {}, unfinished = 0}
end)
T.JoinableQueue = {kind = "Queue", class = Queue, new = T.Queue.new}

function Queue:qsize() return self.tail - self.head + 1 end
function Queue:empty() return self.tail < self.head end
function Queue:full() return self.maxsize > 0 and self:qsize() >= self.maxsize end
function Queue:get(block, timeout)
  local deadline = block_deadline(block, timeout, "get")
  while self.tail < self.head do
    if deadline == false or not park(self.getters, deadline) and self.tail < self.head then
      raise("Empty", "queue is empty")
    end
  end
  local v = self.items[self.head]
  self.items[self.head] = nil
  self.head = self.head + 1
  notify(self.putters, 1)
  -- a getter woken together with others passes the turn on if items remain
  if self.tail >= self.head then notify(self.getters, 1) end
  return v
end
function Queue:put(v, block, timeout)
  local deadline = block_deadline(block, timeout, "put")
  while self:full() do
    if deadline == false or not park(self.putters, deadline) and self:full() then
      raise("Full", "queue is full")
    end
  end
  self.tail = self.tail + 1
  self.items[self.tail] = v
  self.unfinished = self.unfinished + 1
  notify(self.getters, 1)
end
function Queue:get_nowait() return self:get(false) end
function Queue:put_nowait(v) return self:put(v, false) end
function Queue:task_done()
  if self.unfinished <= 0 then raise("Value", "task_done() called too many times") end
  self.unfinished = self.unfinished - 1
  if self.unfinished == 0 then notify(self.joiners) end
end
function Queue:join(timeout)
  local deadline = deadline_of(timeout, "join")
  while self.unfinished > 0 do
    if not park(self.joiners, deadline) and self.unfinished > 0 then return false end
  end
  return true
end

-- Lock (anyone may release, as Python's) and RLock (owned by the connection)
local Lock = class("Lock", "Lock", {}, function() return {held = false, waiters = {}} end)
function Lock:acquire(block, timeout)
  local deadline = block_deadline(block, timeout, "acquire")
  while self.held do
    if deadline == false or not park(self.waiters, deadline) and self.held then return false end
  end
  self.held = true
  self.owner = current_conn
  return true
end
function Lock:release()
  if not self.held then raise("Value", "release of an unlocked lock") end
  self.held = false
  self.owner = nil
  notify(self.waiters, 1)
end
function Lock:locked() return self.held end

local RLock = class("RLock", "Lock", {}, function() return {count = 0, waiters = {}} end)
function RLock:acquire(block, timeout)
  if self.count > 0 and self.owner == current_conn then
    self.count = self.count + 1
    return true
  end
  local deadline = block_deadline(block, timeout, "acquire")
  while self.count > 0 do
    if deadline == false or not park(self.waiters, deadline) and self.count > 0 then return false end
  end
  self.owner, self.count = current_conn, 1
  return true
end
function RLock:release()
  if self.count == 0 or self.owner ~= current_conn then
    raise("Value", "cannot release an RLock held by another process (or not held)")
  end
  self.count = self.count - 1
  if self.count == 0 then
    self.owner = nil
    notify(self.waiters, 1)
  end
end
function RLock:locked() return self.count > 0 end

-- Semaphore and BoundedSemaphore
local Semaphore = class("Semaphore", "Semaphore", {}, function(value)
  value = value == nil and 1 or value
  if math.type(value) ~= "integer" or value < 0 then raise("Value", "Semaphore: value must be a non-negative integer") end
  return {value = value, initial = value, waiters = {}}
end)
function Semaphore:acquire(block, timeout)
  local deadline = block_deadline(block, timeout, "acquire")
  while self.value == 0 do
    if deadline == false or not park(self.waiters, deadline) and self.value == 0 then return false end
  end
  self.value = self.value - 1
  return true
end
function Semaphore:release()
  if self.bounded and self.value >= self.initial then raise("Value", "BoundedSemaphore released too many times") end
  self.value = self.value + 1
  notify(self.waiters, 1)
end
function Semaphore:get_value() return self.value end
function Semaphore:locked() return self.value == 0 end
T.BoundedSemaphore = {kind = "Semaphore", class = Semaphore, new = function(v)
  local s = T.Semaphore.new(v)
  s.bounded = true
  return s
end}

-- Event
local Event = class("Event", "Event", {}, function() return {flag = false, waiters = {}} end)
function Event:set()
  self.flag = true
  notify(self.waiters)
end
function Event:clear() self.flag = false end
function Event:is_set() return self.flag end
function Event:wait(timeout)
  local deadline = deadline_of(timeout, "wait")
  while not self.flag do
    if not park(self.waiters, deadline) then return self.flag end
  end
  return true
end

-- Condition over an RLock (or a Lock/RLock of this manager given as a proxy)
local resolve_local     -- proxy -> the server's own object (set by the server)
local Condition = class("Condition", "Condition", {}, function(lock)
  local l
  if lock ~= nil then
    l = resolve_local(lock)
    if not l or (getmetatable(l) ~= Lock and getmetatable(l) ~= RLock) then
      raise("Value", "Condition: lock must be a Lock or RLock of the same manager")
    end
  else
    l = T.RLock.new()
  end
  return {lock = l, waiters = {}}
end)
local function cond_owned(self)
  local l = self.lock
  if getmetatable(l) == RLock then return l.count > 0 and l.owner == current_conn end
  return l.held and l.owner == current_conn
end
function Condition:acquire(...) return self.lock:acquire(...) end
function Condition:release() return self.lock:release() end
function Condition:wait(timeout)
  if not cond_owned(self) then raise("Value", "cannot wait on an un-acquired condition") end
  local deadline = deadline_of(timeout, "wait")
  local l, saved = self.lock, nil
  if getmetatable(l) == RLock then
    saved = l.count
    l.count = 1
  end
  l:release()
  local notified = park(self.waiters, deadline)
  l:acquire()
  if saved then l.count = saved end
  return notified and true or false
end
function Condition:notify(n)
  if not cond_owned(self) then raise("Value", "cannot notify on an un-acquired condition") end
  notify(self.waiters, n or 1)
end
function Condition:notify_all()
  if not cond_owned(self) then raise("Value", "cannot notify on an un-acquired condition") end
  notify(self.waiters)
end

-- Barrier(parties, [action], [timeout])
local Barrier = class("Barrier", "Barrier", {}, function(parties, action, timeout)
  if math.type(parties) ~= "integer" or parties < 1 then raise("Value", "Barrier: parties must be a positive integer") end
  return {parties = parties, action = action, timeout = timeout, count = 0, gen = 0,
    broken = false, waiters = {}, gen_broken = {}}
end)
local function barrier_break(self)
  self.broken = true
  self.gen_broken[self.gen] = true
  notify(self.waiters)
end
function Barrier:wait(timeout)
  if self.broken then raise("BrokenBarrier", "barrier is broken") end
  local gen = self.gen
  local index = self.count
  self.count = self.count + 1
  if self.count == self.parties then
    if self.action then
      local ok, err = U.pcall(self.action)
      if not ok then
        barrier_break(self)
        error(err, 0)
      end
    end
    self.count = 0
    self.gen = gen + 1
    notify(self.waiters)
    return index
  end
  local deadline = deadline_of(timeout == nil and self.timeout or timeout, "wait")
  while self.gen == gen and not self.gen_broken[gen] do
    if not park(self.waiters, deadline) and self.gen == gen and not self.gen_broken[gen] then
      barrier_break(self)
    end
  end
  if self.gen_broken[gen] then
    if self.gen == gen then self.count = self.count - 1 end
    raise("BrokenBarrier", "barrier is broken")
  end
  return index
end
function Barrier:abort() barrier_break(self) end
function Barrier:reset()
  if self.count > 0 then
    self.gen_broken[self.gen] = true
    notify(self.waiters)
  end
  self.gen = self.gen + 1
  self.count = 0
  self.broken = false
end
function Barrier:__getattr(k)
  if k == "parties" then return self.parties end
  if k == "n_waiting" then return self.count end
  if k == "broken" then return self.broken end
end

local builtin_typeids = {"dict", "list", "Namespace", "Queue", "JoinableQueue", "Lock", "RLock",
  "Semaphore", "BoundedSemaphore", "Event", "Condition", "Barrier", "Value", "Array"}

-- ---- server side: user objects (BaseManager.register) ---------------------------------

-- A luamp queue served to clients: its blocking get parks on the queue's fd instead of
-- blocking the server.
local function luamp_queue_get(q, block, timeout)
  if block == false then return q:get(false) end
  local deadline = deadline_of(timeout, "get")
  while true do
    local ok, v = pcall(q.get, q, false)
    if ok then return v end
    if not core.is_error(v, "Empty") then error(v, 0) end
    if deadline and core.time() >= deadline then raise("Empty", "queue is empty") end
    local fd = q:_wait_begin()
    if fd then park_fd(fd, deadline) end
    q:_wait_end()
  end
end

-- calls method on a user object
local function call_user(entry, method, ...)
  local obj = entry.obj
  if method == "get" and core.is_queue and core.is_queue(obj) then
    return luamp_queue_get(obj, ...)
  end
  if type(obj) == "table" and getmetatable(obj) == nil then
    -- a plain table stands for a dict of its own fields, plus its function fields
    if method == "__getitem" then return obj[(...)] end
    if method == "__setitem" then
      local k, v = ...
      obj[k] = v
      return
    end
    if method == "__len" then return #obj end
    if obj[method] == nil then
      -- the dict proxy's readers, over the table's own fields
      if method == "items" or method == "keys" or method == "values" then
        local out = {}
        for _, k in ipairs(sorted_keys(obj)) do
          out[#out + 1] = method == "items" and {k, obj[k]} or method == "keys" and k or obj[k]
        end
        return out
      end
      if method == "get" then
        local k, default = ...
        local v = obj[k]
        if v == nil then return default end
        return v
      end
      if method == "totable" or method == "copy" then
        local t = {}
        for k, v in pairs(obj) do t[k] = v end
        return t
      end
    end
  end
  local f = obj[method]
  if type(f) ~= "function" and not (getmetatable(f) or {}).__call then
    raise("Value", string.format("'%s' has no method '%s'", entry.typeid, tostring(method)))
  end
  return f(obj, ...)
end

-- ---- the serving loop ------------------------------------------------------------------

local function error_info(e, tb)
  if core.is_error(e) then
    local info = {}
    for k, v in pairs(e) do info[k] = v end
    return info
  end
  return {kind = "Remote", message = tostring(e), remote_error = tostring(e),
    remote_traceback = tb or tostring(e)}
end

local function traceback(e)
  if core.is_error(e) then return e end
  return {raw = e, tb = debug.traceback(tostring(e), 2)}
end

-- serve(listener, authkey, registry, address): runs until a client asks it to stop.
local function serve(listener, authkey, registry, address)
  sched = new_sched()
  local objects, next_id, nobjects = {}, 0, 0
  -- token -> {conn =, ids = {id = true}}: the sessions, each held by a client's connection
  -- that makes no calls, and the objects it owns (made by it, not pinned, not released)
  local sessions = {}
  local conns = {}                    -- list of connection records
  local nclosed, handshaking = 0, 0   -- closed since the poll list was made; not yet authed
  local stop = false
  local my_key = address_key(address)

  resolve_local = function(p)
    local s = S[p]
    if s and s.ref.key == my_key and objects[s.id] then return objects[s.id].obj end
    return nil
  end

  -- object id is never released from now on (a proxy to it is being handed on); id is the
  -- peer's word: anything but an object's id pins nothing
  local function pin_id(id)
    local entry = mtype(id) == "integer" and objects[id]
    if entry and entry.owner then
      entry.owner.ids[id] = nil
      entry.owner = nil
    end
  end

  pin_own_object = function(s)
    if s.ref.key ~= my_key then return false end
    pin_id(s.id)
    return true
  end

  -- An object whose session is known is owned by it (freed when the session releases it
  -- or ends); any other (no session, or one this server does not know) is pinned from
  -- the start.
  local function add_object(obj, typeid, kind, exposed, owner)
    next_id = next_id + 1
    nobjects = nobjects + 1
    local ex
    if exposed then
      ex = {}
      for _, m in ipairs(exposed) do ex[m] = true end
    end
    objects[next_id] = {obj = obj, typeid = typeid, kind = kind, exposed = ex, exposed_list = exposed,
      owner = owner}
    if owner then owner.ids[next_id] = true end
    return next_id
  end

  -- Drops the id's entry, nothing else: the object itself lives on if anything else on the
  -- server holds it (the queue a registered typeid hands out to every caller, the lock of
  -- a Condition).
  local function free(id)
    objects[id] = nil
    nobjects = nobjects - 1
  end

  -- the session sess releases id: only an object it owns (anything else is ignored)
  local function release(sess, id)
    if not sess.ids[id] then return end
    sess.ids[id] = nil
    local entry = objects[id]
    if entry and entry.owner == sess then free(id) end
  end

  local function end_session(sess)
    sessions[sess.token] = nil
    for id in pairs(sess.ids) do
      local entry = objects[id]
      if entry and entry.owner == sess then free(id) end
    end
    sess.ids = {}
  end

  local function new_session(conn)
    if conn.session then return conn.session.token end
    local token
    repeat token = core.random_bytes(16) until not sessions[token]
    local sess = {conn = conn, ids = {}, token = token}
    sessions[token] = sess
    conn.session = sess
    return token
  end

  -- handle(0, "_rel", token, k, id1..idk, id, method, args...): the releases, then the
  -- request they rode on. The peer's word throughout: a token of no session, ids its
  -- session does not own, a bad count release nothing.
  local handle
  local function release_then(token, k, ...)
    local n = select("#", ...)
    if mtype(k) ~= "integer" or k < 0 or k > n - 2 or k > 1024 then
      raise("Value", "malformed release")
    end
    local rest = pack(...)
    local sess = type(token) == "string" and sessions[token]
    if sess then
      for i = 1, k do
        local id = rest[i]
        if mtype(id) == "integer" then release(sess, id) end
      end
    end
    if rest[k + 1] == 0 and rest[k + 2] == "_rel" then raise("Value", "malformed release") end
    return handle(unpack(rest, k + 1, n))
  end

  local function create(token, typeid, ...)
    if type(typeid) ~= "string" then raise("Value", "create: typeid must be a string") end
    local owner = type(token) == "string" and sessions[token] or nil
    local reg = registry[typeid]
    if reg and reg.callable then
      local obj = reg.callable(...)
      if obj == nil then raise("Value", "the callable of '" .. typeid .. "' returned nil") end
      local kind = "Auto"
      if type(obj) == "table" and getmetatable(obj) == nil and not reg.exposed then kind = "Dict" end
      local id = add_object(obj, typeid, kind, reg.exposed, owner)
      return id, typeid, kind, reg.exposed
    end
    local t = T[typeid]
    if not t or not reg or not reg.builtin then
      raise("Value", "unknown typeid '" .. typeid .. "'")
    end
    local obj = t.new(...)
    local id = add_object(obj, typeid, t.kind, nil, owner)
    objects[id].builtin = t.class
    return id, typeid, t.kind
  end

  -- handle(id, method, args...) -> the call's results; or handle(req), a request table
  -- {id, method, nargs, args...} (unpacked here, under the caller's protection: its
  -- nargs is the peer's word)
  handle = function(id, method, ...)
    if mtype(id) ~= "integer" or type(method) ~= "string" then
      if type(id) == "table" then
        local req = id
        local n = req[3]
        if mtype(n) ~= "integer" or n < 0 then raise("Value", "malformed request") end
        return handle(req[1], req[2], unpack(req, 4, 3 + n))
      end
      raise("Value", "malformed request")
    end
    if id == 0 then
      if method == "create" then return create(...) end
      if method == "shutdown" then
        stop = true
        return true
      end
      if method == "ping" then return "pong" end
      if method == "_rel" then return release_then(...) end
      if method == "_session" then return new_session(current_conn) end
      if method == "_pin" then
        pin_id((...))
        return true
      end
      if method == "_count" then return nobjects end
      raise("Value", "unknown manager request '" .. method .. "'")
    end
    local entry = objects[id]
    if not entry then raise("Value", "no object with id " .. id .. " at this manager") end
    if entry.builtin then
      local f = entry.builtin[method]
      if type(f) ~= "function" or method == "__index" then
        raise("Value", string.format("method '%s' of %s is not exposed", method, entry.typeid))
      end
      return f(entry.obj, ...)
    end
    if entry.exposed and not entry.exposed[method] then
      raise("Value", string.format("method '%s' of %s is not exposed", method, entry.typeid))
    end
    if method:sub(1, 1) == "_" and method:sub(1, 2) ~= "__" then
      raise("Value", string.format("method '%s' of %s is not exposed", method, entry.typeid))
    end
    return call_user(entry, method, ...)
  end

  local function close_conn(conn)
    if conn.closed then return end
    conn.closed = true
    nclosed = nclosed + 1
    if not conn.authed then handshaking = handshaking - 1 end
    if conn.waiting then unpark(conn.waiting) end
    conn.co = nil
    conn.ch:close()
    if conn.session then end_session(conn.session) end
  end

  local function send_reply(conn, reply)
    local ok, err = U.pcall(conn.ch.send_reply, conn.ch, reply)
    if not ok then
      if core.is_error(err, "Serialize") then
        ok, err = U.pcall(conn.ch.send, conn.ch, {false, error_info(err)})
      end
      if not ok then close_conn(conn) end
    end
  end

  -- The reply to a call that ended: ok, its results or its error (as traceback made it).
  -- Plain results go as a vector (chan:reply); an error as {false, error fields}.
  local function reply_to(conn, ok, ...)
    if not ok then
      local e = ...
      -- a handler's Interrupted goes on up (out of the coroutine), as U.xpcall would send it
      if interrupted(e) then error(e, 0) end
      if conn.closed then return end
      if type(e) == "table" and e.tb then
        return send_reply(conn, {false, error_info(e.raw, e.tb)})
      end
      return send_reply(conn, {false, error_info(e)})
    end
    if conn.closed then return end
    local ch = conn.ch
    local sent, err = pcall(ch.reply, ch, ...)
    if not sent then
      if interrupted(err) then error(err, 0) end
      if core.is_error(err, "Serialize") then return send_reply(conn, {false, error_info(err)}) end
      close_conn(conn)
    end
  end

  local start_next
  local DONE = {}          -- what a request's coroutine yields when it has its reply
  local idle = {}          -- finished coroutines, reused for the next requests

  -- The body of every request coroutine, given conn and the request (id, method,
  -- args... or a request table): handle it, send the reply (from here, so the results
  -- need not travel out through yield and resume), yield DONE and take the next request.
  -- (A proper tail call: the coroutine's stack does not grow.)
  local function worker(conn, ...)
    reply_to(conn, xpcall(handle, traceback, ...))
    return worker(coroutine.yield(DONE))
  end

  -- what a resume of conn's coroutine gave: parked (a is its waiter), or DONE (replied)
  local function resumed(conn, co, rok, a)
    current_conn = nil
    if rok and a ~= DONE then return end
    conn.co = nil
    if rok then
      idle[#idle + 1] = co
    elseif interrupted(a) then
      error(a, 0)
    elseif not conn.closed then
      send_reply(conn, {false, error_info(a)})
    end
    if #conn.inbox > 0 then start_next(conn) end
  end

  -- resumes conn's request coroutine with the given values
  local function resume(conn, ...)
    local co = conn.co
    current_conn = conn
    return resumed(conn, co, coroutine.resume(co, ...))
  end

  -- runs a request on conn (which runs none): a request table, or id, method, args...
  -- (resume written out: this is every plain call's path)
  local function run(conn, ...)
    local n = #idle
    local co = idle[n]
    if co then
      idle[n] = nil
    else
      co = coroutine.create(worker)
    end
    conn.co = co
    current_conn = conn
    return resumed(conn, co, coroutine.resume(co, conn, ...))
  end

  start_next = function(conn)
    if conn.closed or conn.co or #conn.inbox == 0 then return end
    run(conn, table.remove(conn.inbox, 1))
  end

  -- What one receive gave; false when the connection has nothing more for now (or closed).
  local function received(conn, ok, what, ...)
    if not ok then
      if interrupted(what) then error(what, 0) end
      if core.is_error(what, "Serialize") and conn.ch:authed() then
        -- an authenticated peer sent what this side cannot decode: answer that request
        conn.inbox[#conn.inbox + 1] = {0, "__undecodable", 0}
        conn.bad = what
      else
        close_conn(conn)
        return false
      end
    elseif what == nil then
      return false
    elseif what == "req" then
      -- a plain request: run it from the values themselves when nothing is queued
      if not conn.co and #conn.inbox == 0 then
        run(conn, ...)
        return true
      end
      conn.inbox[#conn.inbox + 1] = {(...), (select(2, ...)), select("#", ...) - 2, select(3, ...)}
    elseif what == "auth" then
      conn.authed = true
      conn.deadline = nil
      handshaking = handshaking - 1
    else
      local msg = ...
      if type(msg) ~= "table" then
        close_conn(conn)
        return false
      end
      conn.inbox[#conn.inbox + 1] = msg
    end
    if not conn.co and #conn.inbox > 0 then
      if conn.bad then
        table.remove(conn.inbox)
        local e = conn.bad
        conn.bad = nil
        send_reply(conn, {false, error_info(e)})
      else
        start_next(conn)
      end
    end
    return true
  end

  local function service(conn)
    local ch = conn.ch
    -- the first receive sends what output waits and reads the socket; later ones only
    -- take frames already buffered (the loop's poll reports anything that arrives after)
    if not received(conn, pcall(ch.receive, ch, false)) then return end
    while not conn.closed and ch:buffered() and received(conn, pcall(ch.receive, ch, true)) do end
  end

  local items, owners, dirty = {}, {}, true
  local ready_buf = {}     -- auth_poll's answer, refilled each time
  while not stop do
    -- run what notify woke
    while #sched.runnable > 0 do
      local batch = sched.runnable
      sched.runnable = {}
      for _, item in ipairs(batch) do
        local w, value = item[1], item[2]
        local conn = w.conn
        if not conn.closed and conn.co == w.co then resume(conn, value) end
      end
    end
    if stop then break end
    -- what to wait for: rebuilt only when connections or fd waits changed
    if dirty or next(sched.fdwait) or nclosed > 0 then
      items, owners = {listener}, {false}
      local live = {}
      for _, c in ipairs(conns) do
        if not c.closed then
          live[#live + 1] = c
          items[#items + 1] = c.ch
          owners[#items] = c
        end
      end
      conns = live
      nclosed = 0
      for w in pairs(sched.fdwait) do
        items[#items + 1] = w.fd
        owners[#items] = w
      end
      dirty = false
    end
    local soonest
    if next(sched.timed) then
      for w in pairs(sched.timed) do
        if not soonest or w.deadline < soonest then soonest = w.deadline end
      end
    end
    if handshaking > 0 then
      for _, c in ipairs(conns) do
        if c.deadline and (not soonest or c.deadline < soonest) then soonest = c.deadline end
      end
    end
    local ready, nready = core.auth_poll(items, soonest and math.max(soonest - core.time(), 0), ready_buf)
    for r = 1, nready do
      local o = owners[ready[r]]
      if o == false then
        for _ = 1, 64 do
          local ok, ch = U.pcall(listener.accept, listener)
          if not ok or not ch then break end
          local c = {ch = ch, inbox = {}, deadline = core.time() + HANDSHAKE_TIMEOUT}
          if U.pcall(ch.start, ch, authkey) then
            conns[#conns + 1] = c
            handshaking = handshaking + 1
            dirty = true
          else
            ch:close()
          end
        end
      elseif o.fd then
        if sched.fdwait[o] then wake(o, true) end
      elseif not o.closed then
        service(o)
      end
    end
    if soonest then
      local now = core.time()
      for w in pairs(sched.timed) do
        if w.deadline <= now then wake(w, false) end
      end
      if handshaking > 0 then
        for _, c in ipairs(conns) do
          if c.deadline and c.deadline <= now and not c.authed then close_conn(c) end
        end
      end
    end
  end
  -- stopping: answer the shutdown request before the connections go
  for _, c in ipairs(conns) do
    if not c.closed then
      for _ = 1, 100 do
        if not c.ch:pending() then break end
        local ok, done = U.pcall(c.ch.flush, c.ch)
        if not ok or done then break end
        core.auth_poll({c.ch}, 0.01)
      end
      close_conn(c)
    end
  end
  listener:close()
end

-- ---- BaseManager -----------------------------------------------------------------------

local BaseManager = {}
local BM = {}            -- manager -> private state

local function bm_state(self)
  local s = BM[self]
  if not s then raise("Value", "not a manager") end
  return s
end

local function listen(address)
  if type(address) == "string" then return core.auth_listen(address) end
  return core.auth_listen(address[1], address[2])
end

local function listener_address(l)
  local host, port = l:address()
  if port then return {host, port} end
  return host
end

local function typeid_method(typeid)
  return function(self, ...)
    local s = bm_state(self)
    if not s.ref then raise("Value", "manager is not started or connected") end
    local sess = session(s.ref)
    local id, tid, kind, exposed = call(s.ref, 0, "create", sess.token, typeid, ...)
    return make_proxy(s.ref, id, tid, kind, exposed, sess)
  end
end

local Server = {}
Server.__index = Server
Server.__name = "luamp.ManagerServer"
function Server:serve_forever()
  local st = rawget(self, "_state")
  if st.served then raise("Value", "server already served") end
  st.served = true
  local ok, err = pcall(serve, st.listener, st.authkey, st.registry, self.address)
  if type(self.address) == "string" then core.auth_unlink(self.address) end
  if not ok then error(err, 0) end
end
Server.__tostring = function(self) return "<ManagerServer at " .. address_key(self.address) .. ">" end

function BaseManager:register(typeid, spec)
  local s = bm_state(self)
  if type(typeid) ~= "string" or typeid == "" then raise("Value", "register: typeid must be a non-empty string") end
  local callable, exposed
  if type(spec) == "table" and getmetatable(spec) == nil then
    callable, exposed = spec.callable, spec.exposed
  else
    callable = spec
  end
  if callable ~= nil and type(callable) ~= "function" and not (getmetatable(callable) or {}).__call then
    raise("Value", "register: callable must be a function")
  end
  if exposed ~= nil then
    if type(exposed) ~= "table" then raise("Value", "register: exposed must be a list of method names") end
    for _, m in ipairs(exposed) do
      if type(m) ~= "string" then raise("Value", "register: exposed must be a list of method names") end
    end
  end
  s.registry[typeid] = {callable = callable, exposed = exposed}
  rawset(self, typeid, typeid_method(typeid))
end

local function manager_started(self, s, child, listener)
  s.child = child
  s.ref = make_ref(s.address, s.authkey)
  rawset(self, "address", s.address)
end

function BaseManager:start()
  local s = bm_state(self)
  if s.ref then raise("Value", "manager already started") end
  local listener = listen(s.address)
  s.address = listener_address(listener)
  if type(s.address) == "string" then s.unlink = s.address end
  local registry, authkey, address = s.registry, s.authkey, s.address
  local child = core.fork(function()
    core.auth_ignore_sigint()
    serve(listener, authkey, registry, address)
    if type(address) == "string" then core.auth_unlink(address) end
    return 0
  end, "worker")
  listener:close()          -- the server's copy is the only one: when it dies, connects fail
  manager_started(self, s, child, listener)
  return self
end

function BaseManager:get_server()
  local s = bm_state(self)
  if s.ref then raise("Value", "manager already started") end
  local listener = listen(s.address)
  local addr = listener_address(listener)
  return setmetatable({address = addr, _state = {listener = listener, authkey = s.authkey,
    registry = s.registry}}, Server)
end

function BaseManager:connect()
  local s = bm_state(self)
  s.ref = make_ref(s.address, s.authkey)
  rawset(self, "address", s.address)
  call(s.ref, 0, "ping")
  return self
end

-- (private, for tests) how many objects the server holds now
function BaseManager:_object_count()
  local s = bm_state(self)
  if not s.ref then raise("Value", "manager is not started or connected") end
  return call(s.ref, 0, "_count")
end

function BaseManager:shutdown()
  local s = BM[self]
  if not s or s.down then return end
  s.down = true
  if s.ref then drop_connection(s.ref.key) end
  if s.ref and s.child then drop_session(s.ref.key) end
  local child = s.child
  if child and child:poll() == nil then
    child:signal(core.SIGTERM)
    child:wait()
  end
  if s.unlink then core.auth_unlink(s.unlink) end
end

local BM_mt = {
  __index = BaseManager,
  __name = "luamp.Manager",
  __close = function(self) self:shutdown() end,
  __gc = function(self)
    local s = BM[self]
    if s and s.child and not s.down and s.owner == core.getpid() and s.child:poll() == nil then
      s.child:signal(core.SIGTERM)
    end
  end,
  __tostring = function(self)
    local s = BM[self]
    local st = s.down and "shutdown" or s.child and "started" or s.ref and "connected" or "initial"
    return string.format("<Manager address=%s %s>", address_key(s.address), st)
  end,
}

local tmp_counter = 0
local function temp_socket_path()
  tmp_counter = tmp_counter + 1
  local dir = os.getenv("TMPDIR") or "/tmp"
  local hex = (core.random_bytes(6):gsub(".", function(c) return string.format("%02x", c:byte()) end))
  local p = string.format("%s/luamp-m%d-%d-%s", dir, core.getpid(), tmp_counter, hex)
  if #p > 107 then p = string.format("/tmp/luamp-m%d-%s", core.getpid(), hex) end
  return p
end

function M.BaseManager(opts)
  opts = U.options("BaseManager", opts, nil, {address = true, authkey = true})
  local address = opts.address ~= nil and check_address("BaseManager", opts.address) or temp_socket_path()
  local self = setmetatable({}, BM_mt)
  BM[self] = {address = address, authkey = check_authkey("BaseManager", opts.authkey),
    registry = {}, owner = core.getpid()}
  rawset(self, "address", address)
  return self
end

function M.Manager(opts)
  local m = M.BaseManager(opts)
  local s = BM[m]
  for _, t in ipairs(builtin_typeids) do
    s.registry[t] = {builtin = true}
    rawset(m, t, typeid_method(t))
  end
  m:start()
  return m
end

return M
