-- luamp.worker: the `luamp worker` program, which runs the tasks of a broker Pool
-- (lua/luamp/broker.lua) taken from a Redis stream.
--
--   luamp worker --broker URL --queue NAME --authkey KEY [--processes N] [-v]
--
-- The parent process starts N children (daemons: they die with it), each one consumer
-- of the group "luamp" on the queue's task stream, and supervises them:
--  - every HEARTBEAT seconds it resets the idle time of the entries its children hold
--    (XCLAIM ... JUSTID to the same consumer), so a long task is not taken away;
--  - a child that dies has its entries put back at once (a new entry, its attempts
--    counted) and is replaced;
--  - on SIGTERM or Ctrl-C it stops the children (each finishes its current task and
--    hands back the rest), hands back what a child left, and exits 0.
-- A child reads batches (XREADGROUP, COUNT adapted so a batch takes about BATCH_TIME),
-- runs them, and sends results, acknowledgements and deletions in one pipeline. Entries
-- idle past the lease (their worker died or stopped) are claimed from XPENDING. An entry
-- whose MAC fails is refused (logged, not acknowledged, never decoded); an entry that is
-- not a task at all is logged and dropped.
local core = require "luamp._core"
local B = require "luamp.broker"

local W = {}

local HEARTBEAT = 0.5          -- seconds between the parent's heartbeats
local BATCH_TIME = 0.02        -- seconds of work a child takes at once
local MAX_BATCH = 500
local FINAL_TIMEOUT = 10       -- seconds a stopping process gives its last Redis calls
local FN_CACHE = 64            -- task functions a worker process keeps loaded
local FLUSH_EVERY = 0.05       -- seconds between result pipelines inside a batch
local DEFAULT_LEASE_MS = 30000
local MIN_LEASE_MS = 1000       -- the shortest lease (a Pool refuses less): > 2 heartbeats
local RECLAIM_EVERY = 0.25      -- seconds between looks for abandoned entries (at least)
local unpack = table.unpack
local now = core.time
local APPLY, STAR = B.APPLY, B.STAR

local verbose = false
local function log(fmt, ...)
  io.stderr:write(string.format("%s luamp worker[%d]: " .. fmt .. "\n", os.date("%H:%M:%S"),
    core.getpid(), ...))
  io.stderr:flush()
end

local function usage(msg)
  io.stderr:write("luamp worker: " .. msg .. "\n" ..
    "usage: luamp worker --broker redis://[:password@]host[:port][/db] --queue NAME --authkey KEY [--processes N] [-v]\n")
  return 2
end

local function parse_args(argv)
  local cfg = {processes = core.cpu_count()}
  local i = 1
  while i <= #argv do
    local a = argv[i]
    local k, v = a:match("^%-%-([%w-]+)=(.*)$")
    if not k then k = a:match("^%-%-([%w-]+)$") end
    if a == "-v" or a == "--verbose" then
      cfg.verbose = true
    elseif k == "broker" or k == "queue" or k == "authkey" or k == "processes" then
      if not v then i = i + 1; v = argv[i] end
      if v == nil then return nil, "--" .. k .. " needs a value" end
      cfg[k] = v
    elseif a == "-h" or a == "--help" then
      return nil, "help"
    else
      return nil, "unknown argument '" .. a .. "'"
    end
    i = i + 1
  end
  if not cfg.broker then return nil, "--broker is required" end
  if not cfg.queue then return nil, "--queue is required" end
  if not cfg.authkey then return nil, "--authkey is required" end
  cfg.processes = math.tointeger(tonumber(cfg.processes))
  if not cfg.processes or cfg.processes < 1 then return nil, "--processes must be a positive integer" end
  return cfg
end

-- Fields of a stream entry ({f1, v1, f2, v2, ...}) as a table, or nil if malformed.
local function fields_of(list)
  if type(list) ~= "table" or #list % 2 ~= 0 or #list > 64 then return nil end
  local t = {}
  for i = 1, #list, 2 do
    if type(list[i]) ~= "string" or type(list[i + 1]) ~= "string" then return nil end
    t[list[i]] = list[i + 1]
  end
  return t
end

local function int_field(s, lo, hi)
  local n = math.tointeger(tonumber(s))
  if n and n >= lo and n <= hi then return n end
end

-- A decoded task message has the shape the caller made; anything else is garbage.
local function valid_task(t)
  return type(t) == "table" and math.type(t.id) == "integer" and type(t.caller) == "string"
    and t.caller:match("^%x+$") and #t.caller <= 64 and type(t.fm) == "string"
    and (t.mode == APPLY or t.mode == B.MAP or t.mode == STAR) and type(t.args) == "table"
    and math.type(t.maxattempts) == "integer"
end

-- ---- running one task ------------------------------------------------------------------

local function run_task(t)
  local f, mode, args = t.fn, t.mode, t.args
  if f == nil then error("the task's function failed its signature check", 0) end
  local n = args.n or #args
  if mode == APPLY then return table.pack(f(unpack(args, 1, n))) end
  local out = {n = n}
  for i = 1, n do
    local a = args[i]
    if mode == STAR then
      if type(a) ~= "table" then error(string.format("item %d is not an argument list", i), 0) end
      out[i] = (f(unpack(a, 1, a.n or #a)))
    else
      out[i] = (f(a))
    end
  end
  return out
end

-- The traceback stops where the worker called the task.
local function traceback_handler(e)
  local tb = debug.traceback(tostring(e), 2)
  local c1 = tb:find("\n%s*%[C%]: in function 'xpcall'")
  local c2 = tb:find("\n%s*luamp/worker%.lua:")
  local cut = c1 and c2 and math.min(c1, c2) or c1 or c2
  return {e, cut and tb:sub(1, cut - 1) or tb}
end

-- ---- a child: one consumer -------------------------------------------------------------

local Child = {}
Child.__index = Child

local function new_child(cfg, name)
  local c = setmetatable({
    cfg = cfg, name = name, key = core.broker_key(cfg.authkey), keys = B.keys(cfg.queue),
    conn = B.connection(cfg.url), batch = 1, reclaim_due = 0,
    outbox = {}, acks = {}, last_flush = now(), refused = {}, fcache = {}, nfcache = 0,
  }, Child)
  return c
end

function Child:reclaim_interval() return RECLAIM_EVERY end

-- Sends the results and acknowledgements gathered so far, in one pipeline.
function Child:flush(timeout)
  if #self.acks == 0 and next(self.outbox) == nil then return end
  local cmds = {}
  for rk, box in pairs(self.outbox) do
    local cmd = {"RPUSH", rk}
    table.move(box.msgs, 1, #box.msgs, 3, cmd)
    cmds[#cmds + 1] = cmd
    cmds[#cmds + 1] = {"EXPIRE", rk, box.ttl}
  end
  if #self.acks > 0 then
    local ack = {"XACK", self.keys.tasks, B.GROUP}
    local del = {"XDEL", self.keys.tasks}
    table.move(self.acks, 1, #self.acks, 4, ack)
    table.move(self.acks, 1, #self.acks, 3, del)
    cmds[#cmds + 1] = ack
    cmds[#cmds + 1] = del
  end
  self.conn:pipeline(cmds, timeout)
  self.outbox, self.acks = {}, {}
  self.last_flush = now()
end

function Child:post(t, result)
  local ok, msg = pcall(core.broker_seal, self.key, result)
  if not ok and result.err and result.err[3] ~= nil then   -- an error value that cannot cross
    result.err[3] = nil
    ok, msg = pcall(core.broker_seal, self.key, result)
  end
  if not ok then
    if core.is_error(msg, "Interrupted") then error(msg, 0) end
    msg = core.broker_seal(self.key, {id = result.id, ok = false,
      err = {"cannot send the result: " .. tostring(msg), ""}})
  end
  local rk = self.keys.results(t.caller)
  local box = self.outbox[rk]
  if not box then box = {msgs = {}, ttl = B.alive_ttl((t.lease_ms or DEFAULT_LEASE_MS) / 1000)}; self.outbox[rk] = box end
  box.msgs[#box.msgs + 1] = msg
end

-- The task's function, from its own sealed message (loaded once per distinct message).
function Child:load_fn(t)
  local f = self.fcache[t.fm]
  if f == nil then
    local ok, v = core.broker_open(self.key, t.fm)
    if not ok or (type(v) ~= "function" and not (type(v) == "table" and getmetatable(v) and getmetatable(v).__call)) then
      return false
    end
    if self.nfcache >= FN_CACHE then self.fcache, self.nfcache = {}, 0 end
    self.fcache[t.fm] = v
    self.nfcache = self.nfcache + 1
    f = v
  end
  t.fn = f
  return true
end

-- Decodes and checks entries: returns the tasks to run ({entry id, fields, task, dc}).
function Child:admit(entries)
  local tasks, callers = {}, {}
  for _, e in ipairs(entries) do
    local id, f, dc = e[1], e[2], e[3]
    if f == nil or f.m == nil then
      log("skipping entry %s: not a luamp task", id)
      self.acks[#self.acks + 1] = id
    else
      local ok, t = core.broker_open(self.key, f.m)
      if not ok then
        if not self.refused[id] then
          self.refused[id] = true
          log("refused entry %s on %s: %s (not signed with this worker's authkey); not acknowledged",
            id, self.conn.url.shown, core.is_error(t) and t.message or tostring(t))
        end
      elseif not valid_task(t) or not self:load_fn(t) then
        log("skipping entry %s: a signed message that is not a task", id)
        self.acks[#self.acks + 1] = id
      else
        local lease = int_field(f.l, MIN_LEASE_MS, 86400000) or DEFAULT_LEASE_MS
        t.lease_ms = lease
        local attempts = (int_field(f.a, 0, 1000000) or 0) + dc
        if attempts > t.maxattempts then
          log("task %s:%d lost its worker %d times: failing it with WorkerLost", t.caller, t.id, attempts - 1)
          self:post(t, {id = t.id, ok = false, err = {kind = "WorkerLost",
            string.format("the task's worker was lost %d times (maxattempts %d)", attempts - 1, t.maxattempts)}})
          self.acks[#self.acks + 1] = id
        else
          tasks[#tasks + 1] = {id = id, f = f, t = t, dc = dc, attempts = attempts}
          callers[t.caller] = true
        end
      end
    end
  end
  if #tasks == 0 then return tasks end
  -- tasks of a caller that is gone (its alive mark expired) are dropped
  local names, cmds = {}, {}
  for cid in pairs(callers) do names[#names + 1] = cid; cmds[#cmds + 1] = {"EXISTS", self.keys.alive(cid)} end
  local r = self.conn:pipeline(cmds)
  local gone = {}
  for i, cid in ipairs(names) do if r[i] == 0 then gone[cid] = true end end
  if next(gone) == nil then return tasks end
  local kept = {}
  for _, k in ipairs(tasks) do
    if gone[k.t.caller] then
      if self.cfg.verbose then log("dropping task %s:%d: its caller is gone", k.t.caller, k.t.id) end
      self.acks[#self.acks + 1] = k.id
    else
      kept[#kept + 1] = k
    end
  end
  return kept
end

-- Puts tasks back in the stream as new entries (this attempt not counted).
function Child:hand_back(tasks, from)
  local cmds = {}
  for i = from, #tasks do
    local k = tasks[i]
    local a = (int_field(k.f.a, 0, 1000000) or 0) + k.dc - 1
    cmds[#cmds + 1] = {"XADD", self.keys.tasks, "*", "m", k.f.m, "l", k.f.l or DEFAULT_LEASE_MS, "a", a}
    self.acks[#self.acks + 1] = k.id
  end
  if #cmds > 0 then
    self.conn:pipeline(cmds, FINAL_TIMEOUT)
    log("handed back %d task(s)", #cmds)
  end
  self:flush(FINAL_TIMEOUT)
end

function Child:run_batch(tasks)
  local t0 = now()
  for i, k in ipairs(tasks) do
    if core.broker_stop_requested() then
      core.broker_in_task(2)
      core.broker_clear_interrupt()
      self:hand_back(tasks, i)
      return
    end
    local t = k.t
    core.broker_in_task(1)
    if self.cfg.verbose then log("task %s:%d (entry %s, attempt %d)", t.caller, t.id, k.id, k.attempts) end
    local ok, v = xpcall(run_task, traceback_handler, t)
    core.broker_in_task(0)
    if not ok and core.is_error(v[1], "Interrupted") and core.broker_stop_requested() then
      core.broker_in_task(2)
      core.broker_clear_interrupt()
      self:hand_back(tasks, i)
      return
    end
    if ok then
      self:post(t, {id = t.id, ok = true, value = v})
    else
      self:post(t, {id = t.id, ok = false, err = {tostring(v[1]), v[2], v[1]}})
    end
    self.acks[#self.acks + 1] = k.id
    if now() - self.last_flush >= FLUSH_EVERY then self:flush() end
  end
  self:flush()
  local per = (now() - t0) / math.max(#tasks, 1)
  self.batch = math.max(1, math.min(MAX_BATCH, math.floor(BATCH_TIME / math.max(per, 1e-6))))
end

-- Entries idle past their lease (their consumer died or stopped), claimed for us. Live
-- consumers' entries never idle much past HEARTBEAT; each candidate's own lease (its l
-- field) decides, and XCLAIM re-checks the idle time atomically.
function Child:reclaim()
  local s = self.keys.tasks
  local pend = self.conn:pipeline({{"XPENDING", s, B.GROUP, "IDLE", MIN_LEASE_MS, "-", "+", 100}})[1]
  if type(pend) ~= "table" or B.is_err(pend) then return {} end
  local cands = {}
  for _, p in ipairs(pend) do
    if type(p) == "table" and type(p[1]) == "string" and p[2] ~= self.name
        and math.type(p[3]) == "integer" and math.type(p[4]) == "integer" then
      cands[#cands + 1] = {id = p[1], idle = p[3], dc = p[4] + 1}
    end
  end
  if #cands == 0 then return {} end
  local cmds = {}
  for i, c in ipairs(cands) do cmds[i] = {"XRANGE", s, c.id, c.id} end
  local ranges = self.conn:pipeline(cmds)
  cmds = {}
  local claimed = {}
  for i, c in ipairs(cands) do
    local e = type(ranges[i]) == "table" and not B.is_err(ranges[i]) and ranges[i][1]
    local f = type(e) == "table" and fields_of(e[2])
    local lease = f and int_field(f.l, MIN_LEASE_MS, 86400000) or DEFAULT_LEASE_MS
    if c.idle >= lease then
      cmds[#cmds + 1] = {"XCLAIM", s, B.GROUP, self.name, lease, c.id}
      claimed[#cmds] = c
    end
  end
  if #cmds == 0 then return {} end
  local got = self.conn:pipeline(cmds)
  local entries = {}
  for i, r in ipairs(got) do
    local e = type(r) == "table" and not B.is_err(r) and r[1]
    if type(e) == "table" and e[1] == claimed[i].id then
      entries[#entries + 1] = {e[1], fields_of(e[2]), claimed[i].dc}
    end
  end
  if #entries > 0 then log("claimed %d task(s) idle past their lease", #entries) end
  return entries
end

function Child:read()
  local block = math.floor(self:reclaim_interval() * 1000)
  local r = self.conn:pipeline({{"XREADGROUP", "GROUP", B.GROUP, self.name, "COUNT", self.batch,
    "BLOCK", block, "STREAMS", self.keys.tasks, ">"}})[1]
  if B.is_err(r) then
    if r.redis_error:match("^NOGROUP") then B.ensure_group(self.conn, self.keys.tasks); return {} end
    self.conn:fail("Value", "XREADGROUP: %s", r.redis_error)
  end
  local entries = {}
  if type(r) ~= "table" then return entries end
  local stream = r[1]
  if type(stream) ~= "table" or type(stream[2]) ~= "table" then return entries end
  for _, e in ipairs(stream[2]) do
    if type(e) == "table" and type(e[1]) == "string" then
      entries[#entries + 1] = {e[1], fields_of(e[2]), 1}
    end
  end
  return entries
end

function Child:step()
  local entries
  if now() >= self.reclaim_due then
    entries = self:reclaim()
    self.reclaim_due = now() + self:reclaim_interval()
  end
  if not entries or #entries == 0 then entries = self:read() end
  if #entries == 0 then return end
  local tasks = self:admit(entries)
  if #tasks > 0 then self:run_batch(tasks) else self:flush() end
end

local function child_main(cfg, name)
  core.broker_trap_stop(true)
  local c = new_child(cfg, name)
  local down = false
  while not core.broker_stop_requested() do
    local ok, e = pcall(Child.step, c)
    if ok then
      if down then log("connected again to %s", c.conn.url.shown); down = false end
    else
      if core.broker_stop_requested() then break end
      if core.is_error(e, "Auth") then log("%s", tostring(e)); os.exit(3) end
      if not core.is_error(e, "BrokenPipe") and not core.is_error(e, "Timeout") then error(e, 0) end
      if not down then log("%s; retrying", e.message); down = true end
      local ok2 = pcall(core.sleep, 0.2)
      if not ok2 then break end
    end
  end
  -- stopping: what was done still goes out (the parent hands back what was not)
  core.broker_in_task(2)
  core.broker_clear_interrupt()
  pcall(Child.flush, c, FINAL_TIMEOUT)
end

-- ---- the parent --------------------------------------------------------------------------

local function hostname()
  local f = io.open("/proc/sys/kernel/hostname")
  local h = f and f:read("l") or "host"
  if f then f:close() end
  return h
end

-- Puts back everything consumer `name` holds (a child that died or left): each becomes a
-- new entry whose attempts count this one. Entries whose MAC fails are left alone.
local function requeue(conn, keys, key, me, name, counted)
  local s = keys.tasks
  local pend = conn:pipeline({{"XPENDING", s, B.GROUP, "-", "+", 1000, name}})[1]
  if type(pend) ~= "table" or B.is_err(pend) or #pend == 0 then return 0 end
  local ids, dcs = {}, {}
  for _, p in ipairs(pend) do
    if type(p) == "table" and type(p[1]) == "string" and math.type(p[4]) == "integer" then
      ids[#ids + 1] = p[1]; dcs[p[1]] = p[4]
    end
  end
  if #ids == 0 then return 0 end
  local cmd = {"XCLAIM", s, B.GROUP, me, 0}
  table.move(ids, 1, #ids, 6, cmd)
  local got = conn:pipeline({cmd})[1]
  local cmds, done = {}, {}
  if type(got) == "table" and not B.is_err(got) then
    for _, e in ipairs(got) do
      local f = type(e) == "table" and type(e[1]) == "string" and dcs[e[1]] and fields_of(e[2])
      if f and f.m and core.broker_open(key, f.m) then
        local a = (int_field(f.a, 0, 1000000) or 0) + (counted and dcs[e[1]] or 0)
        cmds[#cmds + 1] = {"XADD", s, "*", "m", f.m, "l", f.l or DEFAULT_LEASE_MS, "a", a}
        done[#done + 1] = e[1]
      end
    end
  end
  if #done > 0 then
    local ack = {"XACK", s, B.GROUP}
    local del = {"XDEL", s}
    table.move(done, 1, #done, 4, ack)
    table.move(done, 1, #done, 3, del)
    cmds[#cmds + 1] = ack
    cmds[#cmds + 1] = del
    conn:pipeline(cmds)
  end
  return #done
end

-- Keeps the children's entries from going idle.
local function heartbeat(conn, keys, names)
  local cmds = {}
  for _, n in ipairs(names) do cmds[#cmds + 1] = {"XPENDING", keys.tasks, B.GROUP, "-", "+", 1000, n} end
  local r = conn:pipeline(cmds)
  local claims = {}
  for i, n in ipairs(names) do
    local pend = r[i]
    if type(pend) == "table" and not B.is_err(pend) and #pend > 0 then
      local cmd = {"XCLAIM", keys.tasks, B.GROUP, n, 0}
      for _, p in ipairs(pend) do
        if type(p) == "table" and type(p[1]) == "string" then cmd[#cmd + 1] = p[1] end
      end
      cmd[#cmd + 1] = "JUSTID"
      if #cmd > 6 then claims[#claims + 1] = cmd end
    end
  end
  if #claims > 0 then conn:pipeline(claims) end
end

function W.main(argv)
  local cfg, err = parse_args(argv)
  if not cfg then return usage(err) end
  verbose = cfg.verbose
  local luamp = require "luamp"
  local ok, url = pcall(B.parse_url, cfg.broker)
  if not ok then return usage(tostring(url)) end
  ok, err = pcall(B.check_name, "--queue", cfg.queue)
  if not ok then return usage(tostring(err)) end
  cfg.url = url
  core.broker_trap_stop()
  local key = core.broker_key(cfg.authkey)
  local keys = B.keys(cfg.queue)
  local conn = B.connection(url)
  local me = string.format("%s:%d", hostname(), core.getpid())
  ok, err = pcall(function()
    conn:connect()
    B.ensure_group(conn, keys.tasks)
  end)
  if not ok then
    if core.broker_stop_requested() then return 0 end
    log("%s", tostring(err))
    return 1
  end
  log("serving queue %s on %s with %d process(es)", cfg.queue, url.shown, cfg.processes)
  local children, gen = {}, 0
  local function start(slot)
    gen = gen + 1
    local name = string.format("%s:%d", me, gen)
    local p = luamp.Process{target = child_main, args = {cfg, name}, daemon = true,
      name = "worker-" .. gen}
    p:start()
    children[slot] = {proc = p, name = name}
  end
  for i = 1, cfg.processes do start(i) end
  local down = false
  while not core.broker_stop_requested() do
    local sentinels = {}
    for i, ch in ipairs(children) do sentinels[i] = ch.proc.sentinel end
    local wok = pcall(luamp.wait, sentinels, HEARTBEAT)
    if core.broker_stop_requested() then break end
    local step_ok, e = pcall(function()
      for i, ch in ipairs(children) do
        if not ch.proc:is_alive() then
          ch.proc:join()
          local n = requeue(conn, keys, key, me, ch.name, true)
          log("worker process %s ended (exit code %s); %d task(s) put back", ch.name,
            tostring(ch.proc.exitcode), n)
          if ch.proc.exitcode == 3 then error(core.error("Auth", "the server refused the password"), 0) end
          start(i)
        end
      end
      local names = {}
      for i, ch in ipairs(children) do names[i] = ch.name end
      heartbeat(conn, keys, names)
    end)
    if step_ok then
      if down then log("connected again to %s", url.shown); down = false end
    elseif core.is_error(e, "Auth") then
      log("%s", tostring(e)); break
    elseif core.is_error(e, "BrokenPipe") or core.is_error(e, "Timeout") then
      if not down then log("%s; retrying", e.message); down = true end
    elseif not core.is_error(e, "Interrupted") then
      error(e, 0)
    end
    local _ = wok
  end
  -- stop: each child finishes its task and hands back the rest; a second signal
  -- interrupts the tasks (they are handed back), a third kills the processes. The
  -- heartbeat goes on meanwhile, so long tasks finishing are not taken away.
  log("stopping")
  core.broker_clear_interrupt()
  local signals = 1
  local function signal_all(how)
    for _, ch in ipairs(children) do
      if ch.proc:is_alive() then pcall(ch.proc[how], ch.proc) end
    end
  end
  signal_all("terminate")
  while true do
    local sentinels = {}
    for _, ch in ipairs(children) do
      if ch.proc:is_alive() then sentinels[#sentinels + 1] = ch.proc.sentinel end
    end
    if #sentinels == 0 then break end
    local wok = pcall(luamp.wait, sentinels, HEARTBEAT)
    local _, count = core.broker_stop_requested()
    if not wok or count > signals then
      core.broker_clear_interrupt()
      signals = signals + 1
      if signals == 2 then log("interrupting the running tasks"); signal_all("terminate")
      else log("killing the worker processes"); signal_all("kill") end
    end
    local names = {}
    for _, ch in ipairs(children) do if ch.proc:is_alive() then names[#names + 1] = ch.name end end
    if #names > 0 then pcall(heartbeat, conn, keys, names) end
  end
  for _, ch in ipairs(children) do pcall(ch.proc.join, ch.proc) end
  pcall(function()
    for _, ch in ipairs(children) do
      requeue(conn, keys, key, me, ch.name, ch.proc.exitcode ~= 0)
      conn:pipeline({{"XGROUP", "DELCONSUMER", keys.tasks, B.GROUP, ch.name}})
    end
    conn:pipeline({{"XGROUP", "DELCONSUMER", keys.tasks, B.GROUP, me}})
  end)
  conn:close()
  log("stopped")
  return 0
end

return W
