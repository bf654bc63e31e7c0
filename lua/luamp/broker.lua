-- luamp.broker: Pool and Queue across machines, over a Redis server.
--
-- Redis keys for a pool queue Q (the {Q} hash tag keeps one queue on one cluster slot):
--   luamp:{Q}:tasks            a stream of tasks, read by the consumer group "luamp"
--   luamp:{Q}:caller:<cid>     a caller's "alive" mark, with a TTL the caller refreshes
--   luamp:{Q}:results:<cid>    the caller's result list, with a TTL workers refresh
-- A task entry has the fields m (the sealed message), l (the caller's lease, ms) and
-- a (attempts that ended before this entry was added: a task handed back or requeued
-- gets a new entry). Every message is sealed (runtime/redis.c): MAC || codec bytes, and
-- nothing is decoded before its MAC verifies.
--
-- A caller that dies leaves nothing behind for long: its alive mark expires after
-- `ALIVE_TTL(lease)` seconds, workers acknowledge and drop the tasks of a caller whose
-- mark is gone, and its result list expires as long after the last result. A live caller
-- that finds its mark had expired (it was busy elsewhere, or Redis restarted) sends its
-- outstanding tasks again; results are deduplicated by task id, so each reaches it once.
--
-- The Pool's waits are this caller's own: results and callbacks are taken while it
-- waits on the pool (get, wait, next, join, map), not in the background.
local core = require "luamp._core"
local U = require "luamp.util"

local raise = U.raise
local now = core.time
local seal, open_msg = core.broker_seal, core.broker_open
local unpack = table.unpack

local B = {}

local GROUP = "luamp"
local CONNECT_TIMEOUT = 10
local APPLY, MAP, STAR = 0, 1, 2
B.APPLY, B.MAP, B.STAR = APPLY, MAP, STAR
B.GROUP = GROUP

function B.alive_ttl(lease) return math.max(60, math.ceil(4 * lease)) end

-- ---- URLs ------------------------------------------------------------------------------

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- parse_url("redis://[[user]:pass@]host[:port][/db]") -> {host, port, db, user, password,
-- shown}; `shown` is the URL with the password replaced by ***.
function B.parse_url(url)
  if type(url) ~= "string" then raise("Value", "broker: the URL must be a string") end
  local rest = url:match("^redis://(.*)$")
  if not rest then raise("Value", "broker: expected a redis:// URL") end
  local cred, hostpart = rest:match("^(.*)@([^@]*)$")
  if not cred then hostpart = rest end
  local user, password
  if cred then
    local u, p = cred:match("^([^:]*):(.*)$")
    if u then user, password = unescape(u), unescape(p) else user = unescape(cred) end
    if user == "" then user = nil end
  end
  local hostport, db = hostpart:match("^([^/]*)/?(.*)$")
  local host, port = hostport:match("^%[(.+)%]:?(%d*)$")
  if not host then host, port = hostport:match("^([^:]*):?(%d*)$") end
  if not host or host == "" then raise("Value", "broker: no host in the URL") end
  port = port ~= "" and math.tointeger(tonumber(port)) or 6379
  if not port or port < 1 or port > 65535 then raise("Value", "broker: bad port in the URL") end
  if db == "" then db = 0 else db = math.tointeger(tonumber(db)) end
  if not db or db < 0 then raise("Value", "broker: bad database number in the URL") end
  local shown = "redis://" .. (cred and ((user or "") .. (password and ":***" or "") .. "@") or "")
    .. hostport .. "/" .. db
  return {host = host, port = port, db = db, user = user, password = password, shown = shown}
end

-- ---- connections -----------------------------------------------------------------------

local Conn = {}
Conn.__index = Conn
Conn.__name = "luamp.broker.connection"

function B.connection(url)
  local u = type(url) == "table" and url or B.parse_url(url)
  return setmetatable({url = u, raw = nil}, Conn)
end

local function is_err(r) return type(r) == "table" and r.redis_error ~= nil end
B.is_err = is_err

-- Raises `kind` naming the server (password hidden).
function Conn:fail(kind, fmt, ...)
  raise(kind, string.format("%s: " .. fmt, self.url.shown, ...))
end

function Conn:connect()
  if self.raw and not self.raw:closed() then return end
  self.raw = nil
  local u = self.url
  local ok, c = pcall(core.redis_connect, u.host, u.port, CONNECT_TIMEOUT)
  if not ok then
    if core.is_error(c, "Interrupted") then error(c, 0) end
    local msg = core.is_error(c) and c.message or tostring(c)
    self:fail(core.is_error(c, "Timeout") and "Timeout" or "BrokenPipe", "%s", msg)
  end
  local cmds = {}
  if u.password then
    cmds[#cmds + 1] = u.user and {"AUTH", u.user, u.password} or {"AUTH", u.password}
  end
  cmds[#cmds + 1] = {"SELECT", u.db}
  local ok2, r = pcall(c.pipeline, c, cmds, CONNECT_TIMEOUT)
  if not ok2 then
    c:close()
    if core.is_error(r, "Interrupted") then error(r, 0) end
    self:fail("BrokenPipe", "%s", core.is_error(r) and r.message or tostring(r))
  end
  for i, reply in ipairs(r) do
    if is_err(reply) then
      c:close()
      if reply.redis_error:match("^NOAUTH") then
        self:fail("Auth", "the server wants a password (give it in the URL: redis://:password@host)")
      end
      local what = (u.password and i == 1) and "authentication failed" or "cannot select the database"
      self:fail(u.password and i == 1 and "Auth" or "Value", "%s: %s", what, reply.redis_error)
    end
  end
  self.raw = c
end

-- Sends cmds (a list of commands) in one pipeline and returns the replies. A lost
-- connection raises BrokenPipe naming the server; the next call connects again.
function Conn:pipeline(cmds, timeout)
  self:connect()
  local ok, r = pcall(self.raw.pipeline, self.raw, cmds, timeout)
  if ok then
    for _, reply in ipairs(r) do
      if is_err(reply) and reply.redis_error:match("^NOAUTH") then
        self:fail("Auth", "the server wants a password (give it in the URL)")
      end
    end
    return r
  end
  if core.is_error(r, "BrokenPipe") then self:fail("BrokenPipe", "%s", r.message) end
  error(r, 0)
end

-- Sends cmds without waiting for their replies (a later pipeline reads them); an error
-- among them shows as deferred_error().
function Conn:send(cmds, timeout)
  self:connect()
  local ok, r = pcall(self.raw.send, self.raw, cmds, timeout)
  if ok then return end
  if core.is_error(r, "BrokenPipe") then self:fail("BrokenPipe", "%s", r.message) end
  error(r, 0)
end

function Conn:deferred_error()
  return self.raw and self.raw:deferred_error()
end

-- One command; an error reply raises Value.
function Conn:call(...)
  local r = self:pipeline({table.pack(...)})[1]
  if is_err(r) then self:fail("Value", "%s: %s", (...), r.redis_error) end
  return r
end

function Conn:close()
  if self.raw then self.raw:close(); self.raw = nil end
end

-- ---- keys ------------------------------------------------------------------------------

local function check_name(what, name)
  if type(name) ~= "string" or name == "" or #name > 200 or name:find("[%c{}]") then
    raise("Value", what .. " must be a non-empty string without control characters or braces")
  end
  return name
end
B.check_name = check_name

function B.keys(queue)
  local base = "luamp:{" .. queue .. "}:"
  return {
    tasks = base .. "tasks",
    alive = function(cid) return base .. "caller:" .. cid end,
    results = function(cid) return base .. "results:" .. cid end,
  }
end

function B.check_authkey(what, authkey)
  if type(authkey) ~= "string" or authkey == "" then
    raise("Value", what .. ": authkey (a non-empty string) is required: every message is signed with it")
  end
  return core.broker_key(authkey)
end

-- Creates the consumer group (and the stream) unless it exists.
function B.ensure_group(conn, stream)
  local r = conn:pipeline({{"XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM"}})[1]
  if is_err(r) and not r.redis_error:match("^BUSYGROUP") then
    conn:fail("Value", "cannot create the consumer group: %s", r.redis_error)
  end
end

-- ---- Queue -----------------------------------------------------------------------------

local Queue = {}
Queue.__index = Queue
Queue.__name = "luamp.broker.Queue"

local queue_known = {broker = true, name = true, authkey = true}

function B.Queue(opts)
  opts = U.options("Queue", opts, nil, queue_known)
  local name = check_name("Queue: name", opts.name)
  local self = setmetatable({
    conn = B.connection(opts.broker),
    key = B.check_authkey("Queue", opts.authkey),
    list = "luamp:{" .. name .. "}:queue",
    name = name,
  }, Queue)
  self.conn:connect()   -- an unreachable server or a wrong password shows here
  return self
end

local function check_open(self)
  if self.closed then raise("Closed", "the queue is closed") end
end

function Queue:put(v, block, timeout)
  check_open(self)
  local _, _ = block, timeout   -- a Redis list is unbounded: put never waits
  self.conn:call("RPUSH", self.list, seal(self.key, v))
end

function Queue:put_nowait(v) return self:put(v, false) end

function Queue:_open(msg)
  local ok, v = open_msg(self.key, msg)
  if not ok then
    raise("Auth", string.format("Queue %s: refused an item: %s", self.name,
      core.is_error(v) and v.message or tostring(v)))
  end
  return v
end

function Queue:get(block, timeout)
  check_open(self)
  U.check_timeout("get", timeout)
  if block == false or (timeout and timeout <= 0) then
    local r = self.conn:call("LPOP", self.list)
    if not r then raise("Empty", "the queue is empty") end
    return self:_open(r)
  end
  -- BLPOP's own timeout ends the wait; ours is a margin for a slow network
  local t = timeout and math.max(timeout, 0.001) or 0
  local r = self.conn:pipeline({{"BLPOP", self.list, string.format("%.3f", t)}},
    timeout and timeout + CONNECT_TIMEOUT or nil)[1]
  if is_err(r) then self.conn:fail("Value", "BLPOP: %s", r.redis_error) end
  if not r then raise("Empty", "the queue is empty") end
  if type(r) ~= "table" or type(r[2]) ~= "string" then self.conn:fail("Value", "BLPOP: malformed reply") end
  return self:_open(r[2])
end

function Queue:get_nowait() return self:get(false) end

function Queue:qsize()
  check_open(self)
  local n = self.conn:call("LLEN", self.list)
  if math.type(n) ~= "integer" then self.conn:fail("Value", "LLEN: malformed reply") end
  return n
end

function Queue:empty() return self:qsize() == 0 end
function Queue:full() check_open(self); return false end

function Queue:close()
  if self.closed then return end
  self.closed = true
  self.conn:close()
end

Queue.__close = Queue.close

Queue.__tostring = function(self)
  return string.format("<Queue name=%s broker=%s%s>", self.name, self.conn.url.shown,
    self.closed and " closed" or "")
end

-- ---- Pool (the caller's side) ------------------------------------------------------------

local NIL = setmetatable({}, {__name = "luamp.broker.nil"})   -- a nil result in a buffer
local FAILED = {__name = "luamp.broker.failed"}   -- metatable of a failed chunk's mark
local POP_BATCH = 1000          -- results taken per LPOP
local SEND_BATCH = 2000         -- task entries per XADD pipeline
local CHECK_EVERY = 1.0         -- seconds between BLPOPs (a wait re-checks its state)

local function remote_error(e)
  if type(e) ~= "table" then e = {tostring(e), ""} end
  local kind = e.kind == "WorkerLost" and "WorkerLost" or "Remote"
  local msg = tostring(e[1])
  if kind == "WorkerLost" then return core.error(kind, msg) end
  local orig = e[3]
  if orig == nil then orig = msg end
  return core.error(kind, msg, {remote_traceback = tostring(e[2] or ""), remote_error = orig})
end

local function check_callable(f, what)
  local t = type(f)
  if t == "function" then return end
  local mt = getmetatable(f)
  if t == "table" and mt and mt.__call then return end
  raise("Value", what .. ": expected a function, got " .. t)
end

local Pool = {}
local Pool_mt = {__name = "luamp.Pool"}
local S = setmetatable({}, {__mode = "k"})

local AsyncResult = {}
AsyncResult.__index = AsyncResult
AsyncResult.__name = "luamp.AsyncResult"

local IMap = {}
IMap.__index = IMap
IMap.__name = "luamp.IMapIterator"

local pool_known = {broker = true, queue = true, authkey = true, maxattempts = true,
  lease = true, processes = true}

local function state_of(self)
  local st = S[self]
  if not st then raise("Value", "not a Pool") end
  if st.owner ~= core.getpid() then raise("Value", "a Pool can only be used by the process that made it") end
  return st
end

local function check_running(st)
  if st.broken then error(st.broken, 0) end
  if st.state ~= "RUN" then raise("Value", "Pool not running") end
end

-- Sends what is queued, refreshes the alive mark (sending every outstanding task again
-- if it had expired: workers dropped them), all in one pipeline.
local function flush(st, nowait)
  if nowait and now() < st.alive_due then
    -- an apply_async: the task goes out now, its reply is read with the next exchange
    local cmds = {}
    for i, tid in ipairs(st.sends) do
      local task = st.tasks[tid]
      if task then cmds[#cmds + 1] = {"XADD", st.keys.tasks, "*", "m", task.msg, "l", st.lease_ms, "a", 0} end
      st.sends[i] = nil
    end
    if #cmds > 0 then st.conn:send(cmds) end
    return
  end
  while true do
    local cmds = {}
    local t = now()
    local refresh = t >= st.alive_due
    if refresh then cmds[1] = {"SET", st.keys.alive(st.cid), "1", "EX", st.alive_ttl, "GET"} end
    local sends = st.sends
    local nsend = math.min(#sends, SEND_BATCH)
    for i = 1, nsend do
      local task = st.tasks[sends[i]]
      if task then
        cmds[#cmds + 1] = {"XADD", st.keys.tasks, "*", "m", task.msg, "l", st.lease_ms, "a", 0}
      end
    end
    local r = #cmds > 0 and st.conn:pipeline(cmds) or {}
    local deferred = st.conn:deferred_error()
    if deferred then st.conn:fail("Value", "sending tasks: %s", deferred) end
    st.sends = table.move(sends, nsend + 1, #sends, 1, {})
    for _, reply in ipairs(r) do
      if is_err(reply) then st.conn:fail("Value", "sending tasks: %s", reply.redis_error) end
    end
    if refresh then
      st.alive_due = t + st.alive_ttl / 4
      if r[1] == false and st.alive_set then
        -- the mark had gone (we were away too long, or Redis restarted): workers may
        -- have dropped our tasks, so all of them go again
        local again = {}
        for tid in pairs(st.tasks) do again[#again + 1] = tid end
        table.sort(again)
        st.sends = again
      end
      st.alive_set = true
    end
    if #st.sends == 0 then return end
  end
end

local function job_finish(st, job, ok, value)
  if job.ready then return end
  job.ready, job.ok, job.value = true, ok, value
  st.jobs[job] = nil
  local cb = ok and job.callback or job.error_callback
  if cb then
    if ok and job.kind == "apply" then
      st.callbacks[#st.callbacks + 1] = function() cb(unpack(value, 1, value.n)) end
    else
      st.callbacks[#st.callbacks + 1] = function() cb(value) end
    end
  end
  if job.kind == "imap" then job.failed = not ok and value or nil end
  if not ok then
    -- its outstanding chunks are no longer wanted
    for tid, task in pairs(st.tasks) do
      if task.job == job then st.tasks[tid] = nil; st.outstanding = st.outstanding - 1 end
    end
  end
end

local feed_imap

-- The function travels as a sealed message of its own inside the task's: sealed once per
-- function here, and loaded once per distinct message by a worker, not once per task.
local function sealed_fn(st, f)
  local m = st.fcache[f]
  if not m then
    m = seal(st.key, f)
    st.fcache[f] = m
  end
  return m
end

local function new_task(st, job, payload, extra)
  st.next_tid = st.next_tid + 1
  local tid = st.next_tid
  payload.id, payload.caller, payload.q = tid, st.cid, st.queue
  payload.maxattempts = st.maxattempts
  local task = extra or {}
  task.job, task.msg = job, seal(st.key, payload)
  st.tasks[tid] = task
  st.outstanding = st.outstanding + 1
  st.sends[#st.sends + 1] = tid
  return tid
end

-- A result message arrived (already verified and decoded).
local function on_result(st, r)
  if type(r) ~= "table" or math.type(r.id) ~= "integer" then return end
  local task = st.tasks[r.id]
  if not task then return end          -- a duplicate (the task ran twice) or cancelled
  st.tasks[r.id] = nil
  st.outstanding = st.outstanding - 1
  local job = task.job
  if job.ready and job.kind ~= "imap" then return end
  if job.kind == "apply" then
    if r.ok then
      local v = type(r.value) == "table" and r.value or {n = 0}
      job_finish(st, job, true, v)
    else
      job_finish(st, job, false, remote_error(r.err))
    end
    return
  end
  local vals = type(r.value) == "table" and r.value or {}
  if job.kind == "map" then
    if not r.ok then job_finish(st, job, false, remote_error(r.err)); return end
    local res = job.results
    for i = 1, task.n do res[task.first + i - 1] = vals[i] end
    job.left = job.left - 1
    if job.left == 0 then job_finish(st, job, true, res) end
    return
  end
  -- imap: buffer the chunk's values (or its error at its place)
  if job.ended then return end
  if not r.ok then
    job.buf[task.first] = setmetatable({failed = remote_error(r.err), n = task.n}, FAILED)
  else
    for i = 1, task.n do
      local v = vals[i]
      if v == nil then v = NIL end
      if job.ordered then job.buf[task.first + i - 1] = v
      else job.uq[#job.uq + 1] = {v, task.first + i - 1} end
    end
  end
  if not r.ok and not job.ordered then
    job.uq[#job.uq + 1] = setmetatable({failed = job.buf[task.first]}, FAILED)
    job.buf[task.first] = nil
  end
  job.inflight = job.inflight - 1
  feed_imap(st, job)
end

local function run_callbacks(st)
  while #st.callbacks > 0 do
    local cb = table.remove(st.callbacks, 1)
    cb()
  end
end

-- Reconnects within the lease after a lost connection (a restarted Redis); everything
-- outstanding is sent again, since a restarted server may have lost it.
local function recover(st, err)
  local deadline = now() + st.lease
  while true do
    local ok, e = pcall(st.conn.connect, st.conn)
    if ok then break end
    if core.is_error(e, "Interrupted") or core.is_error(e, "Auth") then error(e, 0) end
    if now() >= deadline then
      local broken = core.error("BrokenPipe", string.format("%s (no server again within the lease of %g s)",
        core.is_error(err) and err.message or tostring(err), st.lease))
      st.broken = broken
      error(broken, 0)
    end
    core.sleep(0.1)
  end
  B.ensure_group(st.conn, st.keys.tasks)
  local again = {}
  for tid in pairs(st.tasks) do again[#again + 1] = tid end
  table.sort(again)
  st.sends = again
  st.alive_due, st.alive_set = 0, false   -- the mark goes with the next flush, nothing twice
end

-- Sends queued tasks; a lost connection is recovered (and the tasks sent again).
local function send_now(st, nowait)
  local ok, e = pcall(flush, st, nowait)
  if not ok then
    if not core.is_error(e, "BrokenPipe") then error(e, 0) end
    recover(st, e)
  end
end

-- Takes the results there are, waiting up to `deadline` (nil: CHECK_EVERY at most) for
-- the first one; then runs the callbacks due.
local function pump(st, deadline)
  local ok, e = pcall(function()
    flush(st)
    local rk = st.keys.results(st.cid)
    local got = st.conn:pipeline({{"LPOP", rk, POP_BATCH}})[1]
    if got == false and st.outstanding > 0 then
      local wait = CHECK_EVERY
      if deadline then wait = math.min(wait, math.max(deadline - now(), 0)) end
      wait = math.min(wait, math.max(st.alive_due - now(), 0.01))
      if wait > 0 then
        local r = st.conn:pipeline({{"BLPOP", rk, string.format("%.3f", math.max(wait, 0.01))}},
          wait + CONNECT_TIMEOUT)[1]
        if type(r) == "table" and not is_err(r) then got = {r[2]} end
      end
    end
    if is_err(got) then st.conn:fail("Value", "LPOP: %s", got.redis_error) end
    if type(got) == "table" then
      for _, msg in ipairs(got) do
        if type(msg) == "string" then
          local okm, v = open_msg(st.key, msg)
          if okm then
            on_result(st, v)
          elseif not st.warned then
            st.warned = true
            io.stderr:write(string.format("luamp: Pool %s: refused a result: %s\n", st.queue,
              core.is_error(v) and v.message or tostring(v)))
          end
        end
      end
    end
  end)
  if not ok then
    if not core.is_error(e, "BrokenPipe") then error(e, 0) end
    recover(st, e)
  end
  run_callbacks(st)
end

local function wait_until(st, done, timeout)
  U.check_timeout("wait", timeout)
  local deadline = timeout and now() + math.max(timeout, 0)
  while not done() do
    if st.broken then error(st.broken, 0) end
    if deadline and now() >= deadline then return false end
    pump(st, deadline)
  end
  run_callbacks(st)
  return true
end

-- ---- AsyncResult ---------------------------------------------------------------------

local JOB = setmetatable({}, {__name = "luamp.broker.job"})

function AsyncResult:ready() return self[JOB].ready == true end

function AsyncResult:wait(timeout)
  local job = self[JOB]
  if job.ready then return end
  wait_until(state_of(job.pool), function() return job.ready end, timeout)
end

function AsyncResult:get(timeout)
  local job = self[JOB]
  if not job.ready then
    if not wait_until(state_of(job.pool), function() return job.ready end, timeout) then
      raise("Timeout", string.format("result not ready after %g s", timeout))
    end
  end
  if not job.ok then error(job.value, 0) end
  if job.kind == "apply" then return unpack(job.value, 1, job.value.n) end
  return job.value
end

U.async_result_methods(AsyncResult, JOB)

-- ---- jobs ------------------------------------------------------------------------------

local sequence_len = U.sequence_len

local function call_options(what, opts, known)
  opts = U.call_options(what, opts, known)
  if opts.chunksize ~= nil and (math.type(opts.chunksize) ~= "integer" or opts.chunksize < 1) then
    raise("Value", what .. ": chunksize must be a positive integer")
  end
  for _, k in ipairs{"callback", "error_callback"} do
    if opts[k] ~= nil then check_callable(opts[k], what .. ": " .. k) end
  end
  return opts
end

local function chunk_of(list, first, n)
  local items = table.move(list, first, first + n - 1, 1, {})
  items.n = n
  return items
end

local map_known = {chunksize = true, callback = true, error_callback = true}

local function map_job(self, what, f, list, opts, mode)
  local st = state_of(self)
  check_running(st)
  check_callable(f, what)
  opts = call_options(what, opts, map_known)
  if type(list) == "function" then
    local items, n = {}, 0
    for v in list do n = n + 1; items[n] = v end
    items.n = n
    list = items
  end
  local len = sequence_len(list, what)
  if mode == STAR then
    for i = 1, len do
      if type(list[i]) ~= "table" then
        raise("Value", string.format("%s: item %d is not an argument list", what, i))
      end
    end
  end
  local job = {pool = self, kind = "map", results = {n = len}, left = 0,
    callback = opts.callback, error_callback = opts.error_callback}
  local res = setmetatable({[JOB] = job}, AsyncResult)
  if len == 0 then
    job_finish(st, job, true, job.results)
    run_callbacks(st)
    return res
  end
  st.jobs[job] = true
  local cs = opts.chunksize or math.max(1, math.ceil(len / (st.processes * 4)))
  for first = 1, len, cs do
    local n = math.min(cs, len - first + 1)
    job.left = job.left + 1
    new_task(st, job, {fm = sealed_fn(st, f), mode = mode, args = chunk_of(list, first, n)}, {first = first, n = n})
  end
  send_now(st)
  return res
end

function Pool:map_async(f, list, opts) return map_job(self, "map_async", f, list, opts, MAP) end
function Pool:starmap_async(f, list, opts) return map_job(self, "starmap_async", f, list, opts, STAR) end

local function blocking_map(self, what, f, list, opts, mode)
  if type(opts) == "table" and (opts.callback or opts.error_callback) then
    raise("Value", what .. ": callbacks belong to " .. what .. "_async")
  end
  return map_job(self, what, f, list, opts, mode):get()
end

function Pool:map(f, list, opts) return blocking_map(self, "map", f, list, opts, MAP) end
function Pool:starmap(f, list, opts) return blocking_map(self, "starmap", f, list, opts, STAR) end

local apply_known = {callback = true, error_callback = true}

function Pool:apply_async(f, args, opts)
  local st = state_of(self)
  check_running(st)
  check_callable(f, "apply_async")
  if args ~= nil and type(args) ~= "table" then raise("Value", "apply_async: args must be a table") end
  if type(opts) == "function" then opts = {callback = opts} end
  opts = call_options("apply_async", opts, apply_known)
  local job = {pool = self, kind = "apply", callback = opts.callback, error_callback = opts.error_callback}
  local a = args or {}
  a = table.move(a, 1, a.n or #a, 1, {n = a.n or #a})
  new_task(st, job, {fm = sealed_fn(st, f), mode = APPLY, args = a})
  st.jobs[job] = true
  send_now(st, true)
  return setmetatable({[JOB] = job}, AsyncResult)
end

function Pool:apply(f, args) return self:apply_async(f, args):get() end

-- imap: a window of chunks in flight, refilled as results come.
function feed_imap(st, job)
  while not job.exhausted and job.inflight < job.window do
    local items, n = {}, 0
    if job.iter then
      for _ = 1, job.chunksize do
        local ok, v = pcall(job.iter)
        if not ok then job.input_error = {v}; job.exhausted = true; break end
        if v == nil then job.exhausted = true; break end
        n = n + 1; items[n] = v
      end
    else
      local stop = math.min(job.next_first + job.chunksize - 1, job.len)
      for i = job.next_first, stop do n = n + 1; items[n] = job.list[i] end
      if stop >= job.len then job.exhausted = true end
    end
    if n > 0 then
      items.n = n
      local first = job.next_first
      job.next_first = first + n
      job.pulled = job.pulled + n
      job.inflight = job.inflight + 1
      new_task(st, job, {fm = sealed_fn(st, job.fn), mode = MAP, args = items}, {first = first, n = n})
    end
  end
end

local function imap_take(job)
  if job.ordered then
    local pos = job.yielded + 1
    local v = job.buf[pos]
    if v == nil then return false end
    job.buf[pos] = nil
    if getmetatable(v) == FAILED then
      job.yielded = job.yielded + v.n
      return true, nil, nil, v.failed
    end
    job.yielded = pos
    if v == NIL then v = nil end
    return true, v, pos
  end
  local e = table.remove(job.uq, 1)
  if e == nil then return false end
  if getmetatable(e) == FAILED then
    job.yielded = job.yielded + e.failed.n
    return true, nil, nil, e.failed.failed
  end
  job.yielded = job.yielded + 1
  local v = e[1]
  if v == NIL then v = nil end
  return true, v, e[2]
end

local function imap_end(st, job)
  if job.ended then return end
  job.ended = true
  st.jobs[job] = nil
  for tid, task in pairs(st.tasks) do
    if task.job == job then st.tasks[tid] = nil; st.outstanding = st.outstanding - 1 end
  end
end

function IMap:next(timeout)
  local job = self[JOB]
  if job.ended then return end
  local st = state_of(job.pool)
  U.check_timeout("next", timeout)
  local deadline = timeout and now() + math.max(timeout, 0)
  while true do
    local got, v, pos, err = imap_take(job)
    if got then
      feed_imap(st, job)
      if err ~= nil then error(err, 0) end
      return v, pos
    end
    if job.exhausted and job.yielded >= job.pulled then
      imap_end(st, job)
      if job.input_error then error(job.input_error[1], 0) end
      return
    end
    if deadline and now() >= deadline then
      raise("Timeout", string.format("no result within %g s", timeout))
    end
    pump(st, deadline)
  end
end

IMap.__call = function(self) return self:next() end
IMap.__close = function(self)
  local job = self[JOB]
  if not job.ended and S[job.pool] then imap_end(S[job.pool], job) end
end
IMap.__tostring = function(self)
  local job = self[JOB]
  return string.format("<IMapIterator%s done=%d>", job.ordered and "" or " unordered", job.yielded)
end

local imap_known = {chunksize = true}

local function imap(self, what, f, list, opts, ordered)
  local st = state_of(self)
  check_running(st)
  check_callable(f, what)
  opts = call_options(what, opts, imap_known)
  local job = {pool = self, kind = "imap", fn = f, ordered = ordered, buf = {}, uq = {},
    yielded = 0, pulled = 0, inflight = 0, next_first = 1,
    chunksize = opts.chunksize or 1, window = math.max(st.processes * 8, 64)}
  if type(list) == "function" then job.iter = list
  else job.list = list; job.len = sequence_len(list, what) end
  if job.len == 0 then job.exhausted = true end
  st.jobs[job] = true
  feed_imap(st, job)
  send_now(st)
  local it = setmetatable({[JOB] = job}, IMap)
  return it, nil, nil, it
end

function Pool:imap(f, list, opts) return imap(self, "imap", f, list, opts, true) end
function Pool:imap_unordered(f, list, opts) return imap(self, "imap_unordered", f, list, opts, false) end

-- ---- lifetime --------------------------------------------------------------------------

local function forget(st)
  -- workers drop tasks of a caller without its alive mark; our results go with it
  pcall(st.conn.pipeline, st.conn, {{"DEL", st.keys.alive(st.cid), st.keys.results(st.cid)}}, 5)
  st.conn:close()
end

function Pool:close()
  local st = state_of(self)
  if st.state == "RUN" then st.state = "CLOSE" end
end

function Pool:join()
  local st = state_of(self)
  if st.state == "RUN" then raise("Value", "join: the pool is still running (close or terminate it first)") end
  if st.state == "CLOSE" then
    wait_until(st, function() return st.outstanding == 0 end)
    forget(st)
    st.state = "TERMINATE"
  end
end

function Pool:terminate()
  local st = state_of(self)
  if st.state == "TERMINATE" then return end
  st.state = "TERMINATE"
  local closed = core.error("Closed", "the pool was terminated")
  for job in pairs(st.jobs) do
    if job.kind == "imap" then job.failed = closed; job.exhausted = true; imap_end(st, job)
    else job_finish(st, job, false, closed) end
  end
  st.callbacks = {}
  st.tasks, st.outstanding = {}, 0
  forget(st)
end

Pool_mt.__index = function(self, k)
  if k == "processes" then return S[self].processes end
  if k == "state" then return S[self].state end
  if k == "queue" then return S[self].queue end
  return Pool[k]
end
Pool_mt.__close = function(self) local st = S[self]; if st and st.owner == core.getpid() then self:terminate() end end
-- A collected pool does no network I/O (a collection may come at any moment): its
-- connection closes, and its alive key expiring makes workers drop its tasks.
Pool_mt.__gc = function(self)
  local st = S[self]
  if st and st.owner == core.getpid() and st.state ~= "TERMINATE" then
    st.state = "TERMINATE"
    st.conn:close()
  end
end
Pool_mt.__tostring = function(self)
  local st = S[self]
  return string.format("<Pool broker=%s queue=%s state=%s>", st.conn.url.shown, st.queue, st.state)
end

function B.Pool(opts)
  opts = U.options("Pool", opts, nil, pool_known)
  local queue = check_name("Pool: queue", opts.queue)
  local key = B.check_authkey("Pool", opts.authkey)
  local ma = opts.maxattempts or 3
  if math.type(ma) ~= "integer" or ma < 1 then raise("Value", "Pool: maxattempts must be a positive integer") end
  local lease = opts.lease or 30
  if type(lease) ~= "number" or not (lease >= 1 and lease <= 86400) then
    raise("Value", "Pool: lease must be a number of seconds from 1 to 86400")
  end
  local procs = opts.processes or 4   -- sizes the default chunks: the workers' count is unknown here
  if math.type(procs) ~= "integer" or procs < 1 then raise("Value", "Pool: processes must be a positive integer") end
  local st = {
    owner = core.getpid(), state = "RUN", queue = queue, key = key, keys = B.keys(queue),
    conn = B.connection(opts.broker), cid = core.broker_random_id(), processes = procs,
    maxattempts = ma, lease = lease, lease_ms = math.max(1, math.floor(lease * 1000)),
    alive_ttl = B.alive_ttl(lease), alive_due = 0,
    tasks = {}, outstanding = 0, next_tid = 0, sends = {}, jobs = {}, callbacks = {},
    fcache = setmetatable({}, {__mode = "k"}),
  }
  st.conn:connect()    -- an unreachable server or a wrong password shows here
  B.ensure_group(st.conn, st.keys.tasks)
  flush(st)
  local self = setmetatable({}, Pool_mt)
  S[self] = st
  return self
end

return B
