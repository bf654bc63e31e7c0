-- luamp.process: Process objects and the functions about processes (current_process,
-- parent_process, active_children, getpid...). The fork itself, reaping and the
-- end-of-program join live in runtime/process.c; this file keeps the Python-shaped state:
-- names, identities, the daemon flag, exitcode and the list of active children.
local core = require "luamp._core"
local U = require "luamp.util"
local TR = U.trace_state      -- luamp.trace's switch
-- luamp.trace (LUAMP_TRACE=path traces the run from the start) loads with this part, as
-- the C parts load with the module (runtime/module.c), except in a process luamp spawned
-- (a spawn child, a forkserver): it inherits LUAMP_TRACE, not the trace, and compiled it
-- for nothing.
if not core.spawned() then require "luamp.trace" end

local raise = U.raise
local xpcall = xpcall

-- private state of each Process, keyed by the object (ephemeron table)
local S = setmetatable({}, {__mode = "k"})

local Process = {}
local Process_mt = {}

-- Per-process bookkeeping, in one table, for the process whose pid is `pid` (the count
-- of Process objects made here, which names them, is runtime/process.c's count_process).
-- A forked child writes none of it before its target runs: each page a child writes of
-- the heap it shares with its parent is a page copied (a page fault, ~20 us here), and
-- setting these fields in the child wrote three (two of upvalues, and the new Process,
-- marked by the collector's write barrier when it became `current`). The child takes
-- them over on first use instead (own(), below): whatever reads them calls own() first.
local me = {
  pid = core.getpid(),
  current = nil,       -- the Process object (or MainProcess) for this process
  parent_pid = nil,    -- of the process that started this one, or nil
  parent_name = nil,   -- its name, or its Process object (the name is made when asked for)
  children = {},       -- started and not yet known to have ended: object -> true; false
                       -- in a forked child until it starts one
}
local P = {}           -- the public names (filled in below)

-- The bookkeeping, made this process's own if it was inherited. A child forked by
-- Process:start (runtime/process.c says which, and from which parent) becomes the Process
-- its parent was starting, with no children: the one in its parent's `children` without
-- a handle (start dropped any other before it forked, and sets the handle only in the
-- parent, after the fork). A child of any other fork (a Pool worker, a manager, a
-- library's raw fork) keeps what it inherited, as before.
local function own()
  local pid = core.getpid()
  if me.pid == pid then return me end
  if me.children and core.process_child_of(me.pid) then
    local started
    for p in pairs(me.children) do
      if not S[p].handle then started = p; break end
    end
    if started then
      local was = S[me.current]
      -- the Process this one was, to a grandchild, keeps its pid (the parent's)
      if not was.main and was.pid == nil and not was.handle then was.pid = me.pid end
      me.parent_pid, me.parent_name = me.pid, me.current
      me.current = started
      me.children = false
    end
  end
  me.pid = pid
  return me
end

-- A Process's identity ("1", "2:1"...) and default name are made when first asked for:
-- formatting them for every Process written the string table's pages (and the C
-- stack's, for the number) between one fork and the next. A Process records the one
-- that made it and its count there instead.
local function identity_of(s)
  local id = s.identity
  if id == nil then
    local cs = S[s.creator]
    if cs.main then id = tostring(s.counter) else id = identity_of(cs) .. ":" .. s.counter end
    s.identity = id
  end
  return id
end

local function name_of(s)
  local name = s.name
  if name == nil then
    name = "Process-" .. identity_of(s)
    s.name = name
  end
  return name
end

-- The pid of a Process: its child's, or this process's own for the current one (which a
-- forked child does not write down: see child_main).
local function pid_of(self, s)
  if s.handle then return s.handle:pid() end
  if self == own().current then return core.getpid() end
  return s.pid
end

local function check_open(self)
  local s = S[self]
  if s.closed then raise("Value", "process object is closed") end
  return s
end

local function check_started(self, what)
  local s = check_open(self)
  if not s.handle then raise("Value", "cannot " .. what .. " a process that was not started") end
  return s
end

local function note_exit(self, code)
  if code ~= nil then
    local children = own().children
    if children and children[self] then
      if TR.on then TR.instant("exit", S[self].handle:pid(), {exitcode = code}) end
      children[self] = nil
    end
  end
  return code
end

local function exitcode(self)
  local s = check_open(self)
  if not s.handle then return nil end
  if s.exitcode == nil then s.exitcode = note_exit(self, s.handle:poll()) end
  return s.exitcode
end

local getters = {
  name = function(self) return name_of(S[self]) end,
  daemon = function(self) return S[self].daemon end,
  pid = function(self)
    local s = check_open(self)
    return pid_of(self, s)
  end,
  exitcode = exitcode,
  sentinel = function(self)
    return check_started(self, "get the sentinel of").handle:sentinel()
  end,
  authkey = function(self) return S[self].authkey end,
}
getters.ident = getters.pid

Process_mt.__index = function(self, k)
  local g = getters[k]
  if g then return g(self) end
  return Process[k]
end

Process_mt.__newindex = function(self, k, v)
  local s = S[self]
  if k == "name" then
    if type(v) ~= "string" then raise("Value", "name must be a string") end
    s.name = v
  elseif k == "authkey" then
    if type(v) ~= "string" then raise("Value", "authkey must be a string") end
    s.authkey = v
  elseif k == "daemon" then
    if s.handle then raise("Value", "cannot set daemon status of an active process") end
    s.daemon = not not v
  elseif getters[k] then
    raise("Value", "cannot set " .. k)
  else
    rawset(self, k, v)
  end
end

Process_mt.__tostring = function(self)
  local s = S[self]
  if s.closed then return string.format("<Process name=%s closed>", name_of(s)) end
  local state
  if s.main then
    state = "started"
  elseif not s.handle then
    state = "initial"
  else
    local code = exitcode(self)
    state = code == nil and "started" or ("stopped exitcode=" .. code)
  end
  local pid = pid_of(self, s)
  pid = pid and (" pid=" .. pid) or ""
  return string.format("<Process name=%s%s%s %s>", name_of(s), pid,
    s.daemon and " daemon" or "", state)
end

Process_mt.__name = "luamp.Process"

-- The target of the default run; subclass-style objects pass their own `run`.
function Process:run()
  local s = S[self]
  if s.target then return s.target(U.unpack_args(s.args)) end
end

-- The child's traceback ends where luamp called the target (xpcall in a spawn child, the
-- fork itself in a forked one): the frames below belong to the parent's program (its main
-- chunk, a test runner) and would only mislead.
local function traceback_handler(e)
  local tb = core.error_report(e, 2)
  local cut = tb:find("\n%s*%(%.%.%.tail calls%.%.%.%)\n%s*%[C%]: in function 'xpcall'")
           or tb:find("\n%s*%[C%]: in function 'xpcall'")
           or tb:find("\n%s*%[C%]: in [%w ]*'[%w_.]*fork_process'")
  return cut and tb:sub(1, cut - 1) or tb
end

local function nothing() end

-- What the child of self calls: its run method with self, or for the default run, the
-- target with its arguments (what Process.run would call), found before the fork.
local function run_call(self, s)
  local run = self.run
  if run ~= Process.run then return run, self end
  if s.target == nil then return nothing end
  return s.target, U.unpack_args(s.args)
end

-- A child's target raised (what traceback_handler made of it): reported, exit code 1.
local function child_failed(self, err)
  io.stdout:flush()
  io.stderr:write("Process ", name_of(S[self]), ":\n", err, "\n")
  io.stderr:flush()
  return 1
end

-- The top of a spawn child, once it read its start message, with what run_call gave; the
-- result is the exit code. A forked child does the same from C (run_process in
-- runtime/process.c), reading as few objects as it can before its target runs: every page
-- of memory it shares with its parent that it first touches costs it ~4 us on the VMs
-- luamp is measured on (a written one ~20), and a Lua function here, Process.run's
-- lookups (the Process's __index, S, the arguments' unpacking) touched a dozen.
-- An Interrupted ends the child here like any other error (reported, exit code 1, as
-- Python's KeyboardInterrupt does), and there is nothing to hand it on to (stdout is
-- flushed on the way out: luamp_child_exit in runtime/process.c, or the exit of a spawn
-- child; here only ahead of the report).
local function child_main(self, fn, ...)
  local ok, err = xpcall(fn, traceback_handler, ...)
  if not ok then return child_failed(self, err) end
  return 0
end

-- Under spawn the child is a fresh interpreter (runtime/spawn.c reads this message from
-- its start descriptor). The outer table is plain data, decoded untrusted, so that
-- package.path/cpath are in place before the body (functions, modules by name) is
-- decoded trusted.
local function spawn_payload(self)
  local s = S[self]
  local fields = {}
  for k, v in pairs(self) do
    if k ~= "run" then fields[k] = v end
  end
  local body, fds = core.dumpx({
    target = s.target, args = s.args, name = name_of(s), daemon = s.daemon,
    identity = identity_of(s), run = rawget(self, "run"), fields = fields,
    parent_pid = core.getpid(), parent_name = name_of(S[own().current]),
    authkey = s.authkey,   -- a fork child inherits it with the memory; here it is sent
  }, "args")
  return core.dumps({v = 1, path = package.path, cpath = package.cpath,
    daemon = s.kind or s.daemon, parent_pid = core.getpid(), body = body}), fds
end

function Process:start()
  local s = check_open(self)
  if s.handle then raise("Value", "cannot start a process twice") end
  if core.is_daemon() then raise("Value", "daemonic processes are not allowed to have children") end
  local me = own()
  -- As Python's _cleanup, the children known to have ended (reaped by a join or by an
  -- earlier start: runtime/process.c) leave the list, so nothing keeps them from the
  -- collector; and this one joins it. Both before the start, not after: after a fork the
  -- parent writes as few pages as it can, each one being copied while the child runs. A
  -- start that failed leaves an entry without a handle, dropped here the next time.
  if not me.children then me.children = {} end
  local children = me.children
  for p in pairs(children) do
    local ps = S[p]
    local code = ps.handle and ps.handle:ended()
    if code ~= nil then ps.exitcode = code end
    if code ~= nil or not ps.handle then children[p] = nil end
  end
  children[self] = true
  local m = s.method or P.get_start_method()
  if m == "spawn" or m == "forkserver" then
    -- the descriptors of luamp objects in the args (queues, locks...) go with the message;
    -- a forkserver child gets the same message, forked from the server
    local msg, fds = spawn_payload(self)
    local start = core.spawn
    if m == "forkserver" then start = core.forkserver_spawn end
    local ok, h = pcall(start, msg, s.daemon, fds)
    if fds then fds:close() end
    if not ok then error(h, 0) end
    s.handle = h
  else
    s.handle = core.fork_process(s.daemon, traceback_handler, child_failed, self, run_call(self, s))
  end
  if TR.on then
    local pid = s.handle:pid()
    TR.row(pid, name_of(s))
    TR.instant("start", pid)
  end
end

function Process:join(timeout)
  U.check_timeout("join", timeout)
  local s = check_started(self, "join")
  if self == own().current then raise("Value", "cannot join the current process") end
  local code = s.handle:wait(timeout)
  if code ~= nil then s.exitcode = note_exit(self, code) end
end

function Process:is_alive()
  local s = check_open(self)
  if self == own().current then return true end
  if not s.handle then return false end
  return exitcode(self) == nil
end

function Process:terminate()
  check_started(self, "terminate").handle:signal(core.SIGTERM)
end

function Process:kill()
  check_started(self, "kill").handle:signal(core.SIGKILL)
end

function Process:close()
  local s = S[self]
  if s.closed then return end
  if s.handle then
    s.handle:close()          -- raises Value while the child runs
    local children = own().children
    if children then children[self] = nil end
  end
  s.closed = true
end

local known = {target = true, args = true, name = true, daemon = true, run = true, group = true}

local function new_process(opts)
  opts = U.options("Process", opts, nil, known, type(opts) == "table" and opts.run ~= nil)
  if opts.target ~= nil and type(opts.target) ~= "function" and not (getmetatable(opts.target) or {}).__call then
    raise("Value", "Process: target must be callable")
  end
  if opts.args ~= nil and type(opts.args) ~= "table" then raise("Value", "Process: args must be a table") end
  if opts.name ~= nil and type(opts.name) ~= "string" then raise("Value", "Process: name must be a string") end
  local self = setmetatable({}, Process_mt)
  local me = own()
  local counter = core.count_process()
  S[self] = {
    target = opts.target,
    args = opts.args,
    creator = me.current, counter = counter,   -- identity_of
    name = opts.name,
    daemon = opts.daemon and true or false,
    authkey = S[me.current].authkey,     -- inherited, as in Python
  }
  if opts.run ~= nil then
    if type(opts.run) ~= "function" then raise("Value", "Process: run must be a function") end
    for k, v in pairs(opts) do
      if not known[k] then rawset(self, k, v) end
    end
    rawset(self, "run", opts.run)
  end
  return self
end

-- The main process as a Process-like object.
local main = setmetatable({}, Process_mt)
-- authkey: random per process tree; children inherit it (managers default to it)
S[main] = {name = "MainProcess", identity = "", main = true, daemon = false, pid = core.getpid(),
  authkey = core.random_bytes(32)}
me.current = main

-- A handle on the process that started this one: pid, name, is_alive, join, sentinel.
local Parent = {}
Parent.__index = Parent
Parent.__name = "luamp.ParentProcess"
function Parent:is_alive()
  if core.getppid() == self.pid then return true end
  -- a forkserver's child: its parent is the server, the caller is watched by pidfd
  local fd = rawget(self, "sentinel")
  return fd ~= nil and #core.wait_fds({fd}, 0) == 0
end
function Parent:join(timeout)
  U.check_timeout("join", timeout)
  if not self:is_alive() then return end
  local fd = rawget(self, "sentinel")
  if fd then core.wait_fds({fd}, timeout) end
end
Parent.__tostring = function(self)
  return string.format("<ParentProcess name=%s pid=%d %s>", self.name, self.pid,
    self:is_alive() and "started" or "stopped")
end

local parent_obj

function P.Process(opts) return new_process(opts) end

function P.current_process()
  local current = own().current
  -- the pid is read live: after a raw fork outside luamp, it is still right
  if S[current].main then S[current].pid = core.getpid() end
  return current
end

function P.parent_process()
  local me = own()
  local parent_pid = me.parent_pid
  if not parent_pid then return nil end
  if not parent_obj or parent_obj.pid ~= parent_pid then
    if type(me.parent_name) ~= "string" then me.parent_name = name_of(S[me.parent_name]) end
    parent_obj = setmetatable({pid = parent_pid, name = me.parent_name,
      sentinel = core.pidfd_open(parent_pid)}, Parent)
  end
  return parent_obj
end

function P.active_children()
  local list = {}
  for p in pairs(own().children or {}) do
    if S[p].handle and exitcode(p) == nil then list[#list + 1] = p end
  end
  table.sort(list, function(a, b) return identity_of(S[a]) < identity_of(S[b]) end)
  -- and the workers of this process's pools, as Python lists its pool workers
  local pool = package.loaded["luamp.pool"]
  if pool and pool._active_workers then
    for _, w in ipairs(pool._active_workers()) do list[#list + 1] = w end
  end
  return list
end

P.cpu_count = core.cpu_count
P.getpid = core.getpid
P.getppid = core.getppid
P.sleep = core.sleep
P.time = core.time

-- Start methods (Python's rules): fork is the default; set_start_method may be called
-- once, again only with force.
local ALL_METHODS = {"fork", "spawn", "forkserver"}
local BUILT = {fork = true, spawn = true, forkserver = true}
local method = nil        -- nil until set (get_start_method then answers "fork")

local function check_method(m)
  if m ~= "fork" and m ~= "spawn" and m ~= "forkserver" then
    raise("Value", "cannot find context for " .. tostring(m) ..
      ": the start methods are fork, spawn and forkserver")
  end
  if not BUILT[m] then raise("Value", "the " .. m .. " start method is not built yet") end
  return m
end
P._check_method = check_method

function P.get_start_method(allow_none)
  if method == nil and not allow_none then method = "fork" end
  return method
end
function P.get_all_start_methods() return {table.unpack(ALL_METHODS)} end
function P.set_start_method(m, force)
  if method ~= nil and not force then raise("Value", "context has already been set") end
  if m == nil and force then method = nil; return end
  method = check_method(m)
end

-- Starts fn(table.unpack(args)) in a spawn (or forkserver: method) child of the given
-- kind ("worker": a pool worker); returns the Child handle (for pool workers).
function P._spawn_call(fn, args, kind, method)
  local self = new_process({target = fn, args = args})
  S[self].kind = kind
  local msg, fds = spawn_payload(self)
  local start = core.spawn
  if method == "forkserver" then start = core.forkserver_spawn end
  local ok, h = pcall(start, msg, kind, fds)
  if fds then fds:close() end
  if not ok then error(h, 0) end
  return h
end

-- Runs in a spawn child (runtime/spawn.c): `bytes` is the start message; the result is
-- the exit code. Nothing of the message runs before its plain-data shell is checked.
function P._spawn_main(bytes, fds)
  local ok, outer = pcall(core.loads, bytes)
  if not ok or type(outer) ~= "table" or outer.v ~= 1 or type(outer.body) ~= "string"
     or type(outer.path) ~= "string" or type(outer.cpath) ~= "string"
     or math.type(outer.parent_pid) ~= "integer" then
    io.stderr:write("luamp: spawn child: malformed start message: ", tostring(ok and "bad fields" or outer), "\n")
    return 2
  end
  core.spawn_child_setup(outer.daemon == "worker" and "worker" or (outer.daemon and true or false), outer.parent_pid)
  package.path, package.cpath = outer.path, outer.cpath
  local okb, inner = pcall(core.loadx, outer.body, fds)
  if not okb or type(inner) ~= "table" then
    io.stderr:write("luamp: spawn child: cannot decode the target: ", tostring(inner), "\n")
    return 1
  end
  local opts = {target = inner.target, args = inner.args, name = inner.name,
                daemon = inner.daemon, run = inner.run}
  if inner.run ~= nil and type(inner.fields) == "table" then
    for k, v in pairs(inner.fields) do
      if opts[k] == nil then opts[k] = v end
    end
  end
  local self = new_process(opts)
  S[self].identity = inner.identity
  S[self].method = "spawn"
  if type(inner.authkey) == "string" then S[self].authkey = inner.authkey end
  local me = own()
  me.parent_pid, me.parent_name = inner.parent_pid, inner.parent_name
  local was = S[me.current]
  if not was.main and was.pid == nil and not was.handle then was.pid = me.parent_pid end
  me.current = self
  me.children = false
  core.count_process(true)
  return child_main(self, run_call(self, S[self]))
end

-- the program a spawn child runs (default: see runtime/spawn.c)
function P.set_executable(path)
  if type(path) ~= "string" or path == "" then raise("Value", "set_executable: path must be a non-empty string") end
  core.set_executable(path)
end

-- luamp.Process bound to a start method (get_context)
function P._process_with_method(m, opts)
  local p = new_process(opts)
  S[p].method = m
  return p
end

return P
