-- luamp.trace: a picture of a run, as a Chrome trace-event JSON file (opens in Perfetto or
-- chrome://tracing). luamp.trace_start(path) / luamp.trace_stop(), or LUAMP_TRACE=path in
-- the environment (the file is written when the program's Lua state closes).
--
-- What is recorded, all by the process that started tracing (its children's own pools
-- are not): one row per Process and per pool worker (pid = this program, tid = the
-- child's pid, named by a metadata event); a complete span ("ph":"X") per task chunk
-- a worker ran, from the worker's own clock (CLOCK_MONOTONIC is one clock for every
-- process), named after the task's function, with its job, chunk and item count; the
-- start and exit of processes, WorkerLost and timeouts as instant events; and a span
-- ("cat":"wait") on the main row for each blocking call of this program's that waited at
-- least T.wait_threshold (1 ms): Queue/SimpleQueue/JoinableQueue get, put and join,
-- Lock/RLock/Semaphore/BoundedSemaphore acquire, Event, Condition and Barrier wait.
--
-- Cost: with tracing off, each place that would record checks one boolean (T.on), and the
-- wait methods are the plain C functions (trace_start swaps timing wrappers into their
-- method tables, trace_stop puts the originals back). With it on, an event is a few
-- numbers appended to flat arrays; the JSON is written at stop.
local core = require "luamp._core"

local T = require("luamp.util").trace_state

local st                      -- the trace being recorded: arrays of fields per event

local function reset(path)
  st = {path = path, owner = core.getpid(), n = 0, rows = {},
        ph = {}, name = {}, ts = {}, dur = {}, tid = {}, args = {},
        job = {}, chunk = {}, items = {}, ok = {}}
end

-- Names a row (a child's pid) once.
function T.row(tid, label)
  if st.rows[tid] == nil then st.rows[tid] = label end
end

-- A task chunk's span: t0 and dur in seconds (core.time). Plain stores into arrays, no
-- table per event: this runs once per chunk while tracing.
function T.span(name, tid, t0, dur, job, chunk, items, ok)
  local s = st
  local n = s.n + 1
  s.n = n
  s.ph[n], s.name[n], s.ts[n], s.dur[n], s.tid[n] = "X", name, t0, dur, tid
  s.job[n], s.chunk[n], s.items[n], s.ok[n] = job, chunk, items, ok
end

-- An instant event on a row, now (or at t).
function T.instant(name, tid, args, t)
  local n = st.n + 1
  st.n = n
  st.ph[n], st.name[n], st.ts[n], st.dur[n], st.tid[n], st.args[n] = "i", name, t or core.time(), false, tid, args
end

-- The label of a task function: its global name if it has one, else where it is defined.
local labels = setmetatable({}, {__mode = "k"})
function T.label(f)
  local l = labels[f]
  if l then return l end
  local info = type(f) == "function" and debug.getinfo(f, "S")
  local where = info and (info.short_src .. ":" .. info.linedefined) or tostring(f)
  for k, v in next, _G do
    if v == f and type(k) == "string" then l = k .. " (" .. where .. ")" break end
  end
  l = l or ("function " .. where)
  labels[f] = l
  return l
end

-- ---- waits over a threshold ----------------------------------------------------------

-- A wait shorter than this leaves no span: an uncontended acquire is ~40 ns, and a trace
-- full of them would hide the waits that matter.
T.wait_threshold = 0.001

local function record_wait(name, t0, dur)
  local s = st
  if not s then return end
  local n = s.n + 1
  s.n = n
  s.ph[n], s.name[n], s.ts[n], s.dur[n], s.tid[n] = "W", name, t0, dur, core.getpid()
end

-- The wrapped calls in progress. A wait is a C call that never yields nor re-enters a
-- wait, so a stack of depth 1 is the rule; the stack keeps the wrapper allocation-free.
local depth, wait_name, wait_t0 = 0, {}, {}

-- Closes a wrapped call however it ends (returned, timed out, raised, interrupted): a
-- to-be-closed variable runs without catching the error or touching its traceback.
local wait_end = setmetatable({}, {__close = function()
  local d = depth
  depth = d - 1
  local dur = core.time() - wait_t0[d]
  if dur >= T.wait_threshold and T.on then record_wait(wait_name[d], wait_t0[d], dur) end
end})

local function timed(name, f)
  return function(...)
    local d = depth + 1
    wait_name[d], wait_t0[d] = name, core.time()
    depth = d
    local _ <close> = wait_end
    return f(...)
  end
end

-- {methods table, method, span name, original} for each blocking method, found once.
local waits
local function wait_methods()
  if waits then return waits end
  core._open_all()          -- the queue metatables below are the C parts' (runtime/module.c)
  waits = {}
  local function add(methods, method, label)
    local f = rawget(methods, method)
    if type(f) == "function" then waits[#waits + 1] = {methods, method, label .. " wait", f} end
  end
  local reg = debug.getregistry()
  for _, kind in ipairs {"Queue", "SimpleQueue", "JoinableQueue"} do
    local mt = reg["luamp." .. kind]
    local methods = type(mt) == "table" and mt.__index
    if type(methods) == "table" then
      add(methods, "get", kind .. ".get")
      add(methods, "put", kind .. ".put")
      add(methods, "join", kind .. ".join")
    end
  end
  for _, kind in ipairs {"Lock", "RLock", "Semaphore", "BoundedSemaphore"} do
    add(core.sync_methods(kind), "acquire", kind .. ".acquire")
  end
  add(core.sync_methods("Event"), "wait", "Event.wait")
  add(core.sync_methods("CondCore"), "wait", "Condition.wait")
  add(core.sync_methods("BarrierCore"), "arrive", "Barrier.wait")
  return waits
end

local function time_waits(on)
  for _, w in ipairs(wait_methods()) do
    w[1][w[2]] = on and timed(w[3], w[4]) or w[4]
  end
end

local function json_string(s)
  return '"' .. tostring(s):gsub('[%c"\\\128-\255]', function(c)
    local b = c:byte()
    if c == '"' then return '\\"' elseif c == "\\" then return "\\\\" end
    if b >= 128 then return c end       -- UTF-8 passes as is
    return string.format("\\u%04x", b)
  end) .. '"'
end

local function json_args(a)
  if not a then return "{}" end
  local keys = {}
  for k in pairs(a) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = {}
  for i, k in ipairs(keys) do
    local v = a[k]
    local text
    if math.type(v) == "integer" then text = tostring(v)
    elseif type(v) == "number" then text = v == v and v ~= math.huge and v ~= -math.huge and string.format("%.17g", v) or "null"
    elseif type(v) == "boolean" then text = tostring(v)
    else text = json_string(v) end
    parts[i] = json_string(k) .. ":" .. text
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

local function us(t) return string.format("%.3f", t * 1e6) end

local function write_file(s)
  local pid = s.owner
  local out = {}
  out[#out + 1] = string.format('{"name":"process_name","ph":"M","pid":%d,"tid":%d,"args":{"name":"luamp %d"}}', pid, pid, pid)
  out[#out + 1] = string.format('{"name":"thread_name","ph":"M","pid":%d,"tid":%d,"args":{"name":"main (pid %d)"}}', pid, pid, pid)
  local tids = {}
  for tid in pairs(s.rows) do tids[#tids + 1] = tid end
  table.sort(tids)
  for _, tid in ipairs(tids) do
    out[#out + 1] = string.format('{"name":"thread_name","ph":"M","pid":%d,"tid":%d,"args":{"name":%s}}',
      pid, tid, json_string(s.rows[tid] .. " (pid " .. tid .. ")"))
  end
  local quoted = {}
  for i = 1, s.n do
    local ph = s.ph[i]
    if ph == "X" then
      local name = s.name[i]
      local q = quoted[name]
      if not q then q = json_string(name); quoted[name] = q end
      out[#out + 1] = string.format('{"name":%s,"cat":"task","ph":"X","ts":%.3f,"dur":%.3f,"pid":%d,"tid":%d,"args":{"job":%d,"chunk":%d,"items":%d,"ok":%s}}',
        q, s.ts[i] * 1e6, math.max(s.dur[i], 0) * 1e6, pid, s.tid[i], s.job[i], s.chunk[i], s.items[i],
        s.ok[i] and "true" or "false")
    elseif ph == "W" then
      out[#out + 1] = string.format('{"name":%s,"cat":"wait","ph":"X","ts":%.3f,"dur":%.3f,"pid":%d,"tid":%d,"args":{}}',
        json_string(s.name[i]), s.ts[i] * 1e6, s.dur[i] * 1e6, pid, s.tid[i])
    else
      out[#out + 1] = string.format('{"name":%s,"cat":"event","ph":"i","s":"t","ts":%s,"pid":%d,"tid":%d,"args":%s}',
        json_string(s.name[i]), us(s.ts[i]), pid, s.tid[i], json_args(s.args[i]))
    end
  end
  local f, err = io.open(s.path, "w")
  if not f then
    io.stderr:write("luamp: cannot write the trace: ", tostring(err), "\n")
    return false
  end
  f:write('{"displayTimeUnit":"ms","traceEvents":[\n', table.concat(out, ",\n"), "\n]}\n")
  f:close()
  return true
end

local M = {}

-- trace_start(path): records from now on; a trace already running is written first.
function M.trace_start(path)
  if type(path) ~= "string" or path == "" then
    core.raise("Value", "trace_start: expected a file path")
  end
  if T.on then M.trace_stop() end
  reset(path)
  time_waits(true)
  T.on = true
end

-- trace_stop() -> path: stops recording and writes the file (nil when not tracing).
function M.trace_stop()
  if not T.on then return nil end
  T.on = false
  time_waits(false)
  local s = st
  st = nil
  -- a forked child inherited the parent's recording: only the process that started writes
  if s.owner ~= core.getpid() then return nil end
  write_file(s)
  return s.path
end

-- LUAMP_TRACE=path: trace the whole run, written when the Lua state closes (at exit).
-- A process luamp started with the spawn start method (or a forkserver) inherits the
-- variable, but the trace is its starter's: it neither records nor writes the file.
local env = os.getenv("LUAMP_TRACE")
if env and env ~= "" and not T.on and not core.spawned() then
  M.trace_start(env)
  local owner = core.getpid()
  -- anchored in the registry through package.loaded: collected at lua_close
  T.closer = setmetatable({}, {__gc = function()
    if T.on and st and st.owner == owner and core.getpid() == owner then M.trace_stop() end
  end})
end

M._T = T
return M
