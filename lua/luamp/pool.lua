-- luamp.pool: Pool, AsyncResult, the imap iterators and luamp.poll.
--
-- Design
--  * Each worker is a forked process (core.fork mode "worker": it dies with the parent
--    through PR_SET_PDEATHSIG, yet may start children, so pools nest) joined to the
--    parent by one duplex Connection (luamp.Pipe) and a shared-memory ring (ring.c):
--    messages go through the ring, each direction with an eventfd doorbell that is rung
--    only while the receiver says it sleeps (the parent says so outside its own waits,
--    so pumps and host loops see results); a message carrying descriptors or too big for
--    the ring goes on the socket, behind a marker in the ring that keeps the order. The
--    parent dispatches: it knows exactly which chunks each worker holds, in the order the
--    worker runs them.
--  * Work is cut into chunks (a run of items of one job). A chunk's arguments are
--    encoded once (luamp.dumps) when it is made — except a map's big chunks of the
--    caller's list (lazy_job), encoded from the list straight into the ring when sent
--    (send_lazy) and kept nowhere; a message to a worker carries a batch
--    of chunks plus the definitions of functions that worker has not seen yet (functions
--    are cached in the workers by an id: a map over a million items sends the function
--    once). A function with upvalues other than the global table is re-encoded per call
--    and gets a new id when its bytes changed, so a closure never runs with stale
--    upvalues; a worker keeps at most FN_CACHE functions, the parent says which to drop.
--  * Small chunks of a list job go out as a run (produce_run): their arguments encoded
--    once, cut by the worker into the same chunks. A map's run is run straight through
--    and the answers of its chunks that succeed are sent together (at least every
--    COALESCE_TIME; the ring record's tag says how many chunks a message answers): a
--    map fails as a whole on any error, so nothing but the moment of the answer changes.
--  * A worker runs its chunks in order and answers each with one message
--    {job id, chunk number, ok, seconds, results | error}. So when a worker dies, the
--    first unanswered chunk is the one it was running: that chunk fails with WorkerLost
--    {pid, exitcode}; chunks queued behind it never started and are dispatched again.
--    Death is seen through the process sentinel (a pidfd), waited on together with the
--    connections. The dead worker is replaced.
--  * Prefetch is adaptive (see capacity): the workers report how long chunks take; a
--    busy worker is given more only while its queue holds short, known work (at most
--    PREFETCH_TIME of it, and a fair share of what is left), or one long chunk while
--    there is work for every worker. So short tasks stream without a round trip each,
--    a worker rarely waits for the parent between chunks, and a task never waits behind
--    a long one while another worker is idle (the fifth of five long tasks on four
--    workers starts when the first of them finishes). Chunk arguments above INLINE_MAX
--    follow their message as messages of their own (no second copy). An imap keeps at most a window of items between the input
--    pulled and the results consumed, so an endless generator uses bounded memory.
--  * Progress without a thread: every fd of a pool is a background pump (wait.c). Any
--    luamp call that waits, or luamp.poll(), collects results, feeds the workers and runs
--    callbacks. The pool's own waits (get, map, join, imap) wait on its fds directly.
--    Callbacks are queued while the pool's state is updated and run afterwards; an error
--    in a callback is printed to stderr (like an exception in a thread) and dropped.
--  * Per-task timeouts ({timeout = s}): the parent watches the clock. A worker stamps
--    the start of each task of a timed chunk in a shared-memory word (see TIMED); every
--    pool wait (and as_completed, luamp.poll) reads the stamps of the workers whose head
--    chunk is timed and sleeps no longer than the nearest limit. A task over its limit:
--    its worker is SIGKILLed and written off at once (its queue goes back to the feed,
--    what it still sends is dropped), the task alone fails with Timeout, the other tasks
--    of its chunk are re-sent as chunks of their own, and a replacement is forked in the
--    next round; the sentinel reaps the killed one later.
--  * Ctrl-C: workers ignore SIGINT; a pool wait that sees Interrupted terminates the pool
--    and raises it. terminate() fails every unfinished result with Closed, sends SIGTERM,
--    and SIGKILL after a second. A Pool that is garbage (or leaves a <close> scope) is
--    terminated.
local core = require "luamp._core"
local U = require "luamp.util"
local TR = require("luamp.trace")._T

local raise = U.raise
local now = core.time
-- tasks and results pass only between this process and its own workers: trusted
local dumps, loads = core.dumps, core.loads_trusted
-- dumpx also returns the descriptors that luamp objects in the value need (a bundle, or
-- nil): such a chunk or result travels as a frame of its own with them (see handles.c);
-- loadx decodes trusted, with them
local dumpx, loadx = core.dumpx, core.loadx
local unpack = table.unpack

local APPLY, MAP, STAR = 0, 1, 2
local TIMED = 4                 -- added to the mode of a chunk whose job has a timeout
-- added to the mode of a chunk of a map's run (see produce_run): the worker may answer
-- it together with the run's next chunks, in one message
local COALESCE = 8
local COALESCE_TIME = 0.001     -- seconds a worker holds answers to send them together
-- added to the mode of a message's first chunk in a pool with more workers than CPUs:
-- the worker may spin for its next message after this one, as in a pool that fits its
-- CPUs (see spin_ok)
local SPIN_OK = 16
-- A worker running a timed chunk stamps each task's start in a 64-bit word of shared
-- memory (its slot of an Array the pool makes): bits 40..62 count the timed tasks it has
-- started, bits 0..39 hold the start in microseconds since the pool's epoch (modulo
-- 2^40, about 12 days), or IDLE40 between chunks. One atomic store per task: no
-- message, no system call.
local MASK40 = (1 << 40) - 1
local IDLE40 = MASK40
local SEQMASK = (1 << 23) - 1
local TIMEOUT_POLL = 0.01       -- how often a timed chunk not yet started is looked at
local FN_CACHE = 64             -- functions a worker keeps
-- chunks one worker may hold (besides PREFETCH_TIME and AHEAD_BYTES): tiny tasks of
-- chunksize 1 go out in batches of this many, and each batch costs the parent ~25 us
-- and often a worker's wake-up: at 128, 20,000 tasks took 169 batches and the parent
-- 9-10 ms of CPU; at 512, 40 batches and 6-7 ms (1.6M -> 2.1M tasks/s on Pool(2); on
-- Pool(8), whose wake-ups more often land on the parent's CPU, 1.4M -> 2.1M). At most
-- half the markers a ring keeps room for (ring.c): every chunk answered on its own is a
-- message its worker may leave unread in the ring (at 512 against room for 256, timed
-- chunks filled a ring and killed its worker).
local MAX_AHEAD = math.min(512, core.ring_marker_room // 2)
local PREFETCH_TIME = 0.002     -- seconds of queued work a busy worker may hold
local TINY_CHUNK = 5e-5         -- a chunk this short runs on busy workers only (tiny_busy)
local TINY_ITEM = 2e-6          -- items this short are computation only (see cpu_job)
local STALL_MIN = 0.02          -- a busy worker's chunk this far past its estimate: stalled
local AHEAD_BYTES = 256 * 1024  -- bytes queued to a busy worker
local INLINE_MAX = 16 * 1024    -- larger chunk arguments travel as a message of their own
local SCRATCH_MIN = 1024        -- chunks this large are sliced into a reused table
local TERM_GRACE = 1.0          -- seconds between SIGTERM and SIGKILL in terminate
local NIL = setmetatable({}, {__name = "luamp.pool.nil"})   -- a nil result in a buffer
local FAILED = {__name = "luamp.pool.failed"}   -- metatable of a failed chunk's mark

local Pipe = function(...) return require("luamp.connection").Pipe(...) end

-- ---- small deque ---------------------------------------------------------------------

local function dq_new() return {first = 1, last = 0} end
local function dq_len(q) return q.last - q.first + 1 end
local function dq_push(q, v) local l = q.last + 1; q.last = l; q[l] = v end
local function dq_push_front(q, v) local f = q.first - 1; q.first = f; q[f] = v end
local function dq_peek(q) return q[q.first] end
local function dq_pop(q)
  local f = q.first
  if f > q.last then return nil end
  local v = q[f]
  q[f] = nil
  q.first = f + 1
  return v
end

-- ---- errors and tracebacks -----------------------------------------------------------

-- The worker's traceback stops where the pool called the task: frames below are the
-- pool's own loop and would only mislead.
local function traceback_of(e)
  local tb = core.error_report(e, 3)
  local cut = tb:find("\n%s*luamp/pool%.lua:") or tb:find("\n%s*%[C%]: in function 'xpcall'")
  return cut and tb:sub(1, cut - 1) or tb
end

local function remote_payload(e)
  return {core.error_text(e), traceback_of(e), e}
end

-- The message handler of a task's xpcall (as U.xpcall's, without a closure per task): an
-- Interrupted goes on as it is, and the caller raises it again.
local function task_handler(e)
  if core.is_error(e, "Interrupted") then return e end
  return remote_payload(e)
end

local function remote_error(p, prefix)
  if type(p) ~= "table" then p = {tostring(p), ""} end
  local msg = tostring(p[1])
  return core.error("Remote", (prefix or "") .. msg,
    {remote_traceback = p[2], remote_error = p[3] == nil and msg or p[3]})
end

local function is_error(e, kind) return core.is_error(e, kind) end

-- ---- progress line -------------------------------------------------------------------

local function fmt_time(s)
  if s ~= s or s == math.huge then return "?" end
  s = math.floor(s + 0.5)
  if s >= 3600 then return string.format("%d:%02d:%02d", s // 3600, s % 3600 // 60, s % 60) end
  return string.format("%d:%02d", s // 60, s % 60)
end

local function progress_new(total)
  if not core.isatty(2) then return nil end
  return {t0 = now(), last = 0, total = total}
end

-- final: the last drawing; state (with final): why it ended early ("interrupted",
-- "failed", "terminated"), shown where the ETA was.
local function progress_draw(p, done, final, state)
  local t = now()
  if not final and t - p.last < 0.1 then return end
  p.last = t
  local el = t - p.t0
  local rate = el > 0 and done / el or 0
  local line
  if p.total then
    local pct = p.total > 0 and done * 100 // p.total or 100
    local eta = rate > 0 and (p.total - done) / rate or math.huge
    line = string.format("%d/%d (%d%%) %.1f/s %s", done, p.total, pct, rate,
      state or ("ETA " .. (final and "0:00" or fmt_time(eta))))
  else
    line = string.format("%d done %.1f/s %s%s", done, rate, fmt_time(el), state and " " .. state or "")
  end
  io.stderr:write("\r", line, "\27[K", final and "\n" or "")
  io.stderr:flush()
end

-- ---- the worker process --------------------------------------------------------------

-- Runs one chunk; returns its results (apply: table.pack of the function's results).
-- (The function is a local named `task`: a traceback names the frame "in local 'task'".)
-- stamp (timed chunks only) is called before each task starts.
-- A chunk of a run (see produce_run) takes its items from the run's arguments, decoded
-- once for the run: run_args, from position off.
-- out: a table to fill with the results (reused between big chunks), else a new one.
local function exec_chunk(task, mode, n, abytes, afds, stamp, run_args, off, out)
  if type(task) == "table" and task.bad then error(task.bad, 0) end
  if task == nil then error("internal: unknown function id", 0) end
  local args
  if run_args then args = run_args
  elseif afds then args = loadx(abytes, afds) else args = loads(abytes) end
  off = (off or 1) - 1
  if mode == APPLY then
    if stamp then stamp() end
    return table.pack(task(unpack(args, 1, args.n or #args)))
  end
  out = out or core.table_new(n)
  if mode == MAP then
    if stamp then
      for i = 1, n do stamp(); out[i] = task(args[off + i]) end
    elseif off == 0 then
      -- (the arguments from their first item: one VM instruction of eight per item
      -- less)
      for i = 1, n do out[i] = task(args[i]) end
    else
      for i = 1, n do out[i] = task(args[off + i]) end
    end
  else
    for i = 1, n do
      local a = args[off + i]
      if type(a) ~= "table" then error("starmap: item " .. i .. " is not an argument list", 0) end
      if stamp then stamp() end
      out[i] = task(unpack(a, 1, a.n or #a))
    end
  end
  return out
end

-- Runs items from..to of a map's run (see produce_run) straight through, chunk after
-- chunk of cs items (the run's first item is item 1 of its first chunk); run_pos follows
-- the item running, so that after an error the caller knows whose chunk failed. As
-- exec_chunk, the function is a local named `task`.
local run_pos = 0
local function run_items(task, mode, from, to, args, out, cs)
  run_pos = from
  if type(task) == "table" and task.bad then error(task.bad, 0) end
  if task == nil then error("internal: unknown function id", 0) end
  if mode == MAP then
    for i = from, to do
      run_pos = i
      out[i] = task(args[i])
    end
  else
    for i = from, to do
      run_pos = i
      local a = args[i]
      if type(a) ~= "table" then
        error("starmap: item " .. ((i - 1) % cs + 1) .. " is not an argument list", 0)
      end
      out[i] = task(unpack(a, 1, a.n or #a))
    end
  end
end

-- The worker's next message from the parent: from the ring (ring.c), or from the socket
-- where the ring holds a marker for it; nil when the parent is gone. An empty ring is
-- spun on briefly while the parent is awake, then slept on (its doorbell and the socket,
-- whose EOF says the parent is gone).
-- decoded: the message is decoded where it lies in the ring (ring:take_decoded), and
-- comes back as value, nil, true; one that came on the socket comes as bytes, fds.
-- dst, n: a list message's n items are decoded straight into dst (as _core.loads_into).
local function worker_next(conn, ring, wait_set, spin, decoded, dst, n)
  while true do
    local m, garbled, dec
    if decoded then m, garbled, dec = ring:take_decoded(0, dst, 1, n) else m, garbled = ring:take(0) end
    if dec then return m, nil, true end
    if m then return m end
    if m == false then
      local ok, data, fds = U.pcall(conn._recv, conn)
      if not ok then return nil end
      return data, fds
    end
    -- nil: empty (or garbled: the parent cannot be followed any more)
    if garbled then return nil end
    if not (spin and core.spin_rings(0, nil, ring)) then
      if not ring:set_sleeping(0, true) then
        -- waiting in poll first saves the receive that would find nothing yet; the
        -- receive after it must not block (a task may have left pumps behind, and a
        -- readiness hint never leads to a blocking read)
        local ok, ready = U.pcall(core.wait_fds, wait_set)
        if not ok then return nil end
        local _, still = ring:set_sleeping(0, false)
        -- The doorbell is taken whenever it was seen ringing, not only when the parent
        -- cleared the word this time: a ring that came while the word was being set
        -- (the parent rang, then the ring was found non-empty and the word cleared
        -- here) would otherwise stay counted, and every later poll would return at once
        -- (an idle worker at 100% CPU), as the parent's service_fd does for its side.
        local rang = not still
        for _, fd in ipairs(ready) do rang = rang or fd == wait_set[1] end
        if rang then ring:clear_doorbell(0) end
        if #ready > 0 and not ring:has(0) then
          for _, fd in ipairs(ready) do
            if fd == wait_set[2] then
              -- the socket is readable and no marker announced a message: EOF
              local okr, data = U.pcall(conn._recv_bytes_nowait, conn)
              if not okr or data ~= nil then return nil end
            end
          end
        end
      else
        ring:set_sleeping(0, false)
      end
    end
  end
end

-- Sends a result (or the start report) to the parent: in the ring when it fits and
-- carries no descriptors, else on the socket behind a marker. count: how many chunks it
-- answers (the ring record's tag).
local function worker_post(conn, ring, out, ofds, count)
  if ring:put(1, out, ofds ~= nil, count) then return true end
  return U.pcall(conn._send, conn, out, ofds)
end

-- Encodes msg straight into the ring (ring:put_value: no string is made), or sends it on
-- the socket behind a marker; t, n: the table in msg encoded as its items 1..n (a map's
-- results). Returns false, the error when msg cannot be encoded (nothing was sent); else
-- true, and whether the parent is still there.
local function worker_post_value(conn, ring, msg, count, t, n)
  local oke, inring, out, ofds = U.pcall(ring.put_value, ring, 1, msg, count, t, 1, n)
  if not oke then return false, inring end
  if inring then return true, true end
  local oks = U.pcall(conn._send, conn, out, ofds)
  if ofds then ofds:close() end
  return true, oks
end

-- Encodes and sends the answer to one chunk; false when the parent is gone. rn: res is
-- a map's results, items 1..rn (encoded as that list, not walked as a table).
local answer = {}   -- the answer's table, refilled for each (it is encoded at once)
local function send_result(conn, ring, jobid, k, okc, dt, res, t0, rn)
  answer[1], answer[2], answer[3], answer[4], answer[5], answer[6] = jobid, k, okc, dt, res, t0
  local oke, sent = worker_post_value(conn, ring, answer, 0, rn and res, rn)
  answer[5] = nil
  if oke then return sent end
  local out
  if okc then
    out = dumps({jobid, k, false, dt, {"result could not be sent: " .. tostring(sent), "", sent}})
  else
    -- the error value cannot cross: its string stands in for it
    out = dumps({jobid, k, false, dt, {res[1], res[2], res[1]}})
  end
  return worker_post(conn, ring, out)
end

-- Sends the answers held for coalescing (p: {jobid, first k, count, dt, results, t0,
-- items, chunk size}: whole chunks, the last one maybe short) as one message whose tag
-- says how many chunks it answers; if they cannot be encoded together, chunk by chunk
-- as before (each with its own error).
local function flush_coalesced(conn, ring, p)
  if p[3] > 1 then
    local oke, sent = worker_post_value(conn, ring, {p[1], p[2], true, p[4], p[5], p[6], p[7]},
      p[3], p[5], p[7])
    if oke then return sent end
  end
  local res, pos, cs, items = p[5], 0, p[8], p[7]
  for j = 1, p[3] do
    local n = math.min(cs, items - pos)
    local part = j == 1 and p[3] == 1 and res or table.move(res, pos + 1, pos + n, 1, core.table_new(n))
    pos = pos + n
    if not send_result(conn, ring, p[1], p[2] + j - 1, true, p[4] / p[3], part, p[6]) then
      return false
    end
  end
  return true
end

local function worker_loop(conn, ring, maxtasks, stamps, slot, epoch, spin)
  local fns = {}
  local wait_set = {ring:doorbell_fd(0), conn:fileno()}
  local done = 0
  -- the stamps (see TIMED): started counts timed tasks, and after a chunk it is as if
  -- all of its tasks had run, as the parent counts them
  local started = 0
  local stamp
  if slot then
    stamp = function()
      started = (started + 1) & SEQMASK
      stamps[slot] = (started << 40) | (math.floor((now() - epoch) * 1e6) & MASK40)
    end
  end
  local out, out_n = nil, 0   -- the results table of big chunks, reused
  local argbuf, argbuf_n = nil, 0   -- the arguments table of big chunks, reused
  -- before the first of them: the heap left by the fork is copied at once
  -- (core.own_heap), before the collections their big tables bring write into every page
  -- of it (a fault each, with a TLB flush). Small chunks leave it shared: the parent aged
  -- its objects before the fork (age_heap), so the worker's young collections pass them by.
  local heap_owned = false
  local function big_tables()
    if not heap_owned then
      heap_owned = true
      core.own_heap()
    end
  end
  -- Runs one chunk and answers it; false when the worker must stop (the parent is gone,
  -- or maxtasks chunks are done). (A run's COALESCE is ignored here: with maxtasks,
  -- every chunk is answered on its own.)
  local function run_chunk(jobid, k, fid, mode, n, abytes, afds, run_args, off)
    if mode >= COALESCE then mode = mode - COALESCE end
    local timed = mode >= TIMED
    local base = started
    if timed then mode = mode - TIMED end
    local big = mode ~= APPLY and n >= SCRATCH_MIN
    local dst
    if big and run_args == argbuf and off == 1 then
      -- arguments decoded into argbuf: each result takes its argument's place (read
      -- before it is written), so a big chunk needs one table, not two
      dst = argbuf
    elseif big then
      big_tables()
      out = out or core.table_new(n)
      for i = n + 1, out_n do out[i] = nil end
      out_n = n
      dst = out
    end
    local t0 = now()
    local okc, res = xpcall(exec_chunk, task_handler, fns[fid], mode, n, abytes, afds,
      timed and stamp or nil, run_args, off, dst)
    if not okc and core.is_error(res, "Interrupted") then error(res, 0) end
    if afds then afds:close() end
    local dt = now() - t0
    if timed and stamp then
      started = (base + n) & SEQMASK
      stamps[slot] = (started << 40) | IDLE40
    end
    io.stdout:flush()
    if not send_result(conn, ring, jobid, k, okc, dt, res, t0, okc and mode ~= APPLY and n or nil) then
      return false
    end
    done = done + 1
    return not (maxtasks and done >= maxtasks)
  end
  -- A map's run of n items in chunks of cs from chunk k on, run straight through in
  -- stretches of whole chunks; the answers of the chunks that succeed are sent together
  -- (one message per stretch, at least every COALESCE_TIME), a chunk that fails is
  -- answered with its error on its own and the run goes on with the next chunk, as if
  -- each chunk had run by itself.
  local function run_coalesced(jobid, k, fid, mode, n, cs, args)
    local task = fns[fid]
    local out = core.table_new(n)
    local stretch = math.max(cs, 64 // cs * cs)   -- items between looks at the clock
    local from = 1       -- the first item not yet answered
    local pos = 1        -- the first item not yet run
    local t0 = now()
    local function flush(upto)   -- answers items from..upto (whole chunks)
      if upto < from then return true end
      local res = out
      if from > 1 or upto < n then res = table.move(out, from, upto, 1, core.table_new(upto - from + 1)) end
      local nch = (upto - from) // cs + 1
      local t = now()
      -- (the size of each chunk is worked out only if they go one by one: a list of
      -- them was half the worker's work on chunks of one tiny task)
      local ok = flush_coalesced(conn, ring, {jobid, k + (from - 1) // cs, nch, t - t0,
        res, t0, upto - from + 1, cs})
      from, t0 = upto + 1, t
      return ok
    end
    while pos <= n do
      local to = math.min(n, pos + stretch - 1)
      local okc, err = U.xpcall(run_items, remote_payload, task, mode, pos, to, args, out, cs)
      io.stdout:flush()
      if okc then
        pos = to + 1
        if pos > n or now() - t0 >= COALESCE_TIME then
          if not flush(pos - 1) then return false end
        end
      else
        -- the chunk of item run_pos failed: the chunks before it are answered, then it
        local c0 = (run_pos - 1) // cs * cs + 1          -- its first item
        local c1 = math.min(n, c0 + cs - 1)
        if not flush(c0 - 1) then return false end
        local t = now()
        if not send_result(conn, ring, jobid, k + (c0 - 1) // cs, false, t - t0, err, t0) then
          return false
        end
        from, pos, t0 = c1 + 1, c1 + 1, t
      end
    end
    done = done + (n + cs - 1) // cs
    return true
  end
  local spin_now = spin
  while true do
    local bytes = worker_next(conn, ring, wait_set, spin_now)
    if not bytes then return 0 end         -- EOF: the parent is gone
    local msg = loads(bytes)
    if not msg then return 0 end           -- stop
    spin_now = spin
    if math.type(msg[7]) == "integer" and msg[7] >= SPIN_OK then
      msg[7] = msg[7] - SPIN_OK
      spin_now = true
    end
    local defs, drops = msg[1], msg[2]
    if drops then for _, id in ipairs(drops) do fns[id] = nil end end
    if defs then
      for i = 1, #defs, 2 do
        local okf, f = U.pcall(loads, defs[i + 1])
        -- a string id is a global function the parent defined or changed since the fork
        if type(defs[i]) == "string" then
          if okf then rawset(_G, defs[i], f) end
        else
          fns[defs[i]] = okf and f or {bad = f}
        end
      end
    end
    -- the arguments of the message's run, if any (see send_chunks)
    local run_args = msg[3] and loads(msg[3]) or nil
    for i = 4, #msg, 6 do
      local jobid, k, fid, mode, n = msg[i], msg[i + 1], msg[i + 2], msg[i + 3], msg[i + 4]
      local abytes = msg[i + 5]
      if math.type(abytes) == "integer" and mode >= COALESCE and not maxtasks then
        if -abytes < 1 or not run_args then return 0 end
        if not run_coalesced(jobid, k, fid, mode - COALESCE, n, -abytes, run_args) then return 0 end
      elseif math.type(abytes) == "integer" then
        -- a run: chunks of -abytes items from k on, over the run's n items
        local cs, off = -abytes, 1
        if cs < 1 or not run_args then return 0 end
        while off <= n do
          local cn = math.min(cs, n - off + 1)
          if not run_chunk(jobid, k, fid, mode, cn, nil, nil, run_args, off) then return 0 end
          k, off = k + 1, off + cn
        end
      else
        local afds, args
        if not abytes then
          -- the arguments follow as a message of their own: decoded where they lie in
          -- the ring (a big chunk's list straight into a table reused from chunk to
          -- chunk), or from the socket behind a marker
          local dst
          if mode & 3 ~= APPLY and n >= SCRATCH_MIN then
            big_tables()
            argbuf = argbuf or core.table_new(n)
            for i = n + 1, argbuf_n do argbuf[i] = nil end
            argbuf_n, dst = n, argbuf
          end
          local data, fds, decoded = worker_next(conn, ring, wait_set, spin_now, true, dst, n)
          if data == nil and not decoded then return 0 end
          if decoded then args = dst or data else abytes, afds = data, fds end
        end
        if args ~= nil then
          if not run_chunk(jobid, k, fid, mode, n, nil, nil, args, 1) then return 0 end
        elseif not run_chunk(jobid, k, fid, mode, n, abytes, afds) then return 0 end
      end
    end
  end
end

-- Entry of a worker process (runs in the child after fork).
local creating_method   -- the start method of the Pool being made by _pool_with_method

local function worker_main(st, parent_end, conn, ring, stamps, slot)
  core.worker_setup()
  parent_end:close()
  -- ends that belong to the parent: holding them would keep sockets alive; and the
  -- parent's handles of the workers forked before this one (here only a copy, whose
  -- close frees the pidfd and never waits for or signals the sibling)
  for _, w in ipairs(st.workers) do
    U.pcall(w.conn.close, w.conn)
    if w.ring then w.ring:close() end
    if w.handle then w.handle:close() end
  end
  if st.initializer then
    local ok, e = U.xpcall(st.initializer, remote_payload, U.unpack_args(st.initargs))
    if not ok then
      local okd, out = U.pcall(dumps, e)
      if not okd then out = dumps({e[1], e[2]}) end
      worker_post(conn, ring, out)
      return 1
    end
  end
  if not worker_post(conn, ring, dumps(true)) then return 0 end
  return worker_loop(conn, ring, st.maxtasks, stamps, slot, st.epoch, st.spin)
end

-- ---- parent side: functions ----------------------------------------------------------

-- A function whose only upvalue (if any) is the global table cannot change: its encoding
-- is cached for good. Others are re-encoded per call and keep their id while unchanged.
local function is_fixed(f)
  if type(f) ~= "function" then return false end
  for i = 1, 255 do
    local name, v = debug.getupvalue(f, i)
    if name == nil then return true end
    if v ~= _G then return false end
  end
  return false
end

local function func_entry(st, f)
  local e = st.fcache[f]
  if e and e.fixed then return e end
  local bytes = dumps(f, "the task function")
  if e and e.bytes == bytes then return e end
  st.next_fid = st.next_fid + 1
  e = {id = st.next_fid, bytes = bytes, fixed = is_fixed(f), est = e and e.est,
       est_job = e and e.est_job}
  st.fcache[f] = e
  return e
end

-- ---- global functions a task reads -----------------------------------------------------
-- A worker has the globals of the moment it was forked. A task that calls a global
-- function defined or changed later (typed in the REPL after the Pool was made, or
-- redefined by the script) would call nil or the old one. So with each job go the global
-- functions its function reads (OP_GETTABUP _ENV, found in its bytecode by
-- core.global_reads), and those they read in turn, whose value differs from the one in
-- the parent when the pool was made; each worker is sent a given value once.

local reads_of = setmetatable({}, {__mode = "k"})     -- function -> global names it reads
local lua_fn = setmetatable({}, {__mode = "k"})       -- function -> is a Lua function
local gbytes = setmetatable({}, {__mode = "k"})       -- function -> its encoding

local function is_lua_fn(v)
  local yes = lua_fn[v]
  if yes == nil then
    yes = debug.getinfo(v, "S").what ~= "C"
    lua_fn[v] = yes
  end
  return yes
end

-- The function-valued globals now: what a worker forked now starts with.
local function global_functions()
  local t = {}
  for k, v in next, _G do
    if type(v) == "function" then t[k] = v end
  end
  return t
end

-- {name, bytes, value, ...} of the global functions f reads (through other global
-- functions too) that changed since the pool was made; nil when none did.
-- The walk depends only on the values of the globals it looks at: st.gmemo[f] keeps its
-- answer with those names and values ({answer, n, name, value, ...}), and while they are
-- the same the answer is too (a task per call costs no walk and no tables).
local function changed_globals(st, f)
  if type(f) ~= "function" or not is_lua_fn(f) then return nil end
  local memo = st.gmemo[f]
  if memo then
    local same = true
    for i = 3, memo[2], 2 do
      if not rawequal(rawget(_G, memo[i]), memo[i + 1]) then same = false; break end
    end
    if same then return memo[1] end
  end
  memo = {false, 2}
  local out
  local seen, stack = {}, {f}
  while #stack > 0 do
    local g = table.remove(stack)
    local names = reads_of[g]
    if not names then
      names = core.global_reads(g)
      reads_of[g] = names
    end
    for _, name in ipairs(names) do
      if not seen[name] then
        seen[name] = true
        local v = rawget(_G, name)
        local m = memo[2]
        memo[m + 1], memo[m + 2], memo[2] = name, v, m + 2
        if type(v) == "function" and is_lua_fn(v) then
          stack[#stack + 1] = v
          if st.gbase[name] ~= v then
            local bytes = gbytes[v]
            if not bytes then
              -- one that cannot cross (it captured a file, say) is not sent: the worker
              -- keeps what it had, as before this rule existed
              local ok, b = U.pcall(dumps, v)
              bytes = ok and b or false
              gbytes[v] = bytes
            end
            if bytes then
              out = out or {}
              out[#out + 1], out[#out + 2], out[#out + 3] = name, bytes, v
            end
          end
        end
      end
    end
  end
  memo[1] = out
  st.gmemo[f] = memo
  return out
end

-- Adds to defs the globals of job that worker w has not got yet.
local function send_globals(w, job, defs)
  local g = job.globals
  if not g then return defs end
  for i = 1, #g, 3 do
    local name, v = g[i], g[i + 2]
    if w.gknown[name] ~= v then
      w.gknown[name] = v
      defs = defs or {}
      defs[#defs + 1], defs[#defs + 2] = name, g[i + 1]
    end
  end
  return defs
end

local function check_callable(f, what)
  if type(f) == "function" then return end
  local mt = getmetatable(f)
  if type(mt) == "table" and mt.__call then return end
  raise("Value", what .. ": expected a function, got " .. type(f))
end

-- ---- parent side: jobs ---------------------------------------------------------------

local queue_callback, dispatch, spawn, terminate, service_fd, worker_ended, pool_interrupted
local feed_job, repopulate

local finish_count = 0   -- orders results by finishing time (as_completed)

local function job_finish(st, job, ok, value)
  if job.ready then return end
  job.ready, job.ok, job.value = true, ok, value
  finish_count = finish_count + 1
  job.finished = finish_count
  job.exhausted = true
  if job.retry.last >= job.retry.first then job.retry = dq_new() end
  st.jobs[job.id] = nil
  st.njobs = st.njobs - 1
  if job.progress then
    local state
    if not ok then
      state = st.interrupted and "interrupted" or is_error(value, "Closed") and "terminated" or "failed"
    end
    progress_draw(job.progress, job.done_items, true, state)
    job.progress = nil
  end
  if ok and job.callback then
    if job.kind == "apply" then queue_callback(st, job.callback, unpack(value, 1, value.n))
    else queue_callback(st, job.callback, value) end
  elseif not ok and job.error_callback then
    queue_callback(st, job.error_callback, value)
  end
end

-- A chunk of an imap failed: its first position raises err, the rest are skipped.
local function imap_mark_error(job, c, err)
  if job.ordered then
    job.buf[c.first] = setmetatable({err = err, skip = c.n}, FAILED)
  else
    dq_push(job.uq, setmetatable({err = err, skip = c.n}, FAILED))
  end
  job.done_items = job.done_items + c.n
end

local function chunk_failed(st, job, c, err)
  if job.ready or job.cancelled then return end
  if job.kind == "imap" then
    imap_mark_error(job, c, err)
  else
    job_finish(st, job, false, err)
  end
end

local function chunk_ok(st, job, c, res)
  if job.ready or job.cancelled then return end
  local n = c.n
  if job.kind == "apply" then
    job.done_items = 1
    job_finish(st, job, true, res)
    return
  end
  if type(res) ~= "table" and not (res == true and job.kind == "map") then
    chunk_failed(st, job, c, core.error("Remote", "malformed result from a worker"))
    return
  end
  job.done_items = job.done_items + n
  if job.kind == "map" then
    if res ~= true then table.move(res, 1, n, c.first, job.results) end
    if job.progress then progress_draw(job.progress, job.done_items) end
    if job.done_items >= job.total then
      job_finish(st, job, not job.timeout_err, job.timeout_err or job.results)
    end
  else
    if job.ordered then
      local buf, first = job.buf, c.first
      for i = 1, n do
        local v = res[i]
        if v == nil then v = NIL end
        buf[first + i - 1] = v
      end
    else
      for i = 1, n do
        local v = res[i]
        if v == nil then v = NIL end
        dq_push(job.uq, v)
        dq_push(job.uq, c.first + i - 1)
      end
    end
    if job.progress then progress_draw(job.progress, job.done_items) end
  end
end

-- A chunk that cannot be encoded: the error again with the path naming the item in the
-- caller's list (`items[7].f`), not its place in the chunk.
local function item_error(args, n, first, err)
  if not is_error(err, "Serialize") then return err end
  for i = 1, n do
    local ok, e = U.pcall(dumps, args[i], string.format("items[%d]", first + i - 1))
    if not ok then return e end
  end
  return err
end

-- Makes the next chunk of a job: returns it, or nil (nothing now; `job.exhausted` tells
-- whether there will ever be more).
-- A chunk of a run that goes out again (its worker died) travels on its own: its items
-- are cut from the run's arguments (as encoded when the run was made).
local function unrun(c)
  local r = c.run
  local args = r.args or loads(r.bytes)
  r.args = args
  local off = c.first - r.first + 1
  c.bytes = dumps(table.move(args, off, off + c.n - 1, 1, core.table_new(c.n)))
  c.run = nil
end

-- Whether the chunks of job are encoded only when they are sent (send_lazy): a map's
-- big chunks of the caller's list, untimed. Their arguments go from the list straight
-- into the ring; none is kept: a chunk that goes out again (its worker died before it
-- started) is encoded from the list again.
local function lazy_job(job)
  return job.kind == "map" and job.list ~= nil and not job.timeout and job.chunksize >= SCRATCH_MIN
end

local function produce(st, job)
  local c = dq_pop(job.retry)
  if c then
    if c.run then unrun(c) end
    return c
  end
  if job.exhausted then return nil end
  if job.window and job.pulled - job.consumed >= job.window then return nil end
  local first = job.pulled + 1
  local args, n
  if lazy_job(job) then
    local last = math.min(job.len, first + job.chunksize - 1)
    n = last - first + 1
    if n <= 0 then job.exhausted = true; return nil end
    if last >= job.len then job.exhausted = true end
    job.pulled = job.pulled + n
    job.next_k = job.next_k + 1
    return {job = job, k = job.next_k, first = first, n = n, lazy = true}
  end
  if job.kind == "apply" then
    -- encoded when submitted
    job.exhausted, job.pulled, job.next_k = true, 1, 1
    local bytes, fds = job.abytes, job.afds
    job.abytes, job.afds = nil, nil
    return {job = job, k = 1, first = 1, n = 1, bytes = bytes, fds = fds}
  elseif job.list then
    local last = math.min(job.len, first + job.chunksize - 1)
    n = last - first + 1
    if n <= 0 then job.exhausted = true; return nil end
    if last >= job.len then job.exhausted = true end
    -- the items are encoded straight from the caller's list (no table is made for them);
    -- an item that cannot be encoded is then looked for in a slice
    local ok, bytes, fds = U.pcall(dumpx, job.list, nil, job.list, first, last)
    if ok then
      job.pulled = job.pulled + n
      job.next_k = job.next_k + 1
      return {job = job, k = job.next_k, first = first, n = n, bytes = bytes, fds = fds}
    end
    args = core.table_slice(job.list, first, last)
  else
    args, n = {}, 0
    local iter = job.iter
    for _ = 1, job.chunksize do
      local ok, v = U.pcall(iter)
      if not ok then
        job.input_error, job.exhausted = {v}, true
        break
      end
      if v == nil then job.exhausted = true; break end
      n = n + 1
      args[n] = v
    end
    if n == 0 then return nil end
  end
  job.pulled = job.pulled + n
  job.next_k = job.next_k + 1
  c = {job = job, k = job.next_k, first = first, n = n}
  local ok, bytes, fds = U.pcall(dumpx, args)
  if not ok then
    bytes = item_error(args, n, first, bytes)
    if job.kind == "imap" then
      chunk_failed(st, job, c, bytes)
      return produce(st, job)
    end
    job_finish(st, job, false, bytes)
    return nil
  end
  c.bytes, c.fds = bytes, fds
  return c
end

-- Up to m fresh chunks of a list job whose arguments are encoded together, once (a
-- run): the worker decodes them once too. nil (nothing made) when the job cannot make a
-- run now; the caller then makes chunks one by one, which also reports an item that
-- cannot be encoded by its place, and carries the descriptors of luamp objects. The
-- chunks of a map's run carry COALESCE: the worker may answer several in one message.
local function produce_run(st, job, m)
  local cs = job.chunksize
  -- (chunks of SCRATCH_MIN items or more gain nothing: they go one by one, into a
  -- reused table)
  if cs >= SCRATCH_MIN or job.no_runs or job.exhausted or not job.list or job.timeout
      or dq_len(job.retry) > 0 then
    return nil
  end
  if job.window then
    m = math.min(m, -(-(job.window - (job.pulled - job.consumed)) // cs))
  end
  local first = job.pulled + 1
  local last = math.min(job.len, job.pulled + m * cs)
  if last - first + 1 <= cs then return nil end   -- one chunk: nothing to share
  local ok, bytes, fds = U.pcall(dumpx, job.list, nil, job.list, first, last)
  if not ok or fds then
    if fds then fds:close() end
    job.no_runs = true
    return nil
  end
  -- (what the chunks share: their arguments, the first item, the mode, the bytes each
  -- stands for)
  local run = {bytes = bytes, first = first,
               mode = job.kind == "map" and job.mode + COALESCE or job.mode,
               size = #bytes * cs // (last - first + 1)}
  -- the run's chunks are one span (see split_head): no table per chunk
  local total = last - first + 1
  local span = (total + cs - 1) // cs
  local c = {job = job, k = job.next_k + 1, first = first, n = cs, run = run, span = span,
             total = total}
  job.next_k = job.next_k + span
  job.pulled = last
  if last >= job.len then job.exhausted = true end
  return {c}, #bytes
end

-- The oldest job that can make a chunk now (jobs whose imap window is full are passed
-- over); jobs that will never make one again leave the feed.
local function feed_head(st)
  local feed = st.feed
  local i = feed.first
  while i <= feed.last do
    local job = feed[i]
    if job then
      local more = dq_len(job.retry) > 0 or not job.exhausted
      if more and not job.cancelled and not job.ready then
        if dq_len(job.retry) > 0 or not job.window or job.pulled - job.consumed < job.window then
          return job
        end
      else
        job.feeding = false
        feed[i] = false
      end
    end
    if not feed[i] and i == feed.first then dq_pop(feed) end
    i = i + 1
  end
  return nil
end

function feed_job(st, job, front)
  if job.feeding then return end
  job.feeding = true
  if front then dq_push_front(st.feed, job) else dq_push(st.feed, job) end
end

-- ---- parent side: workers ------------------------------------------------------------

-- (and whether some worker has no sentinel fd, so that the waits look at the workers'
-- states every tick: see wait_once and wait_many)
local function rebuild_fds(st)
  local fds, by_fd = {}, {}
  local no_sentinel = false
  for _, w in ipairs(st.workers) do
    if not w.eof then fds[#fds + 1] = w.cfd; by_fd[w.cfd] = w end
    fds[#fds + 1] = w.efd; by_fd[w.efd] = w
    if w.sfd and w.sfd >= 0 then fds[#fds + 1] = w.sfd; by_fd[w.sfd] = w else no_sentinel = true end
  end
  st.fds, st.by_fd, st.fds_dirty, st.no_sentinel = fds, by_fd, false, no_sentinel
end

-- The workers that may have something to say: every one that holds chunks, has not
-- reported its start, or owes a message, and perhaps some that no longer do (st.active,
-- a superset). The loops of every round of a wait (tiny_busy, a dispatch to busy
-- workers, spin_for_result, drain_unannounced, set_awake, check_timeouts) go over these
-- alone: in Pool(8) on 2 CPUs with tiny tasks, six of the eight hold nothing, and going
-- over them several times per round (a C call each in set_awake) cost 20,000 tasks of
-- chunksize 1 about 6% of their throughput.
-- A worker joins when it starts or is given chunks; it leaves in prune_active, once it
-- holds and owes nothing and has no message waiting, with its doorbell word set: a
-- worker not in the list always rings the doorbell for whatever it sends.
local function join_active(w)
  if not w.in_active then
    w.in_active = true
    local a = w.active
    a[#a + 1] = w
  end
end

local function is_idle(w)
  local q = w.inflight
  return q.first > q.last and w.init_seen and w.owed == 0
end

local function prune_active(st)
  local a, n = st.active, 0
  for i = 1, #a do
    local w = a[i]
    a[i] = nil
    local keep = not w.dead
    if keep and is_idle(w) then
      local pending = w.ring:set_sleeping(1, true)
      keep = pending
    end
    if keep then
      n = n + 1
      a[n] = w
    else
      w.in_active = false
    end
  end
end

local function unregister(st, w)
  core.pump_remove(w.cfd)
  core.pump_remove(w.efd)
  if w.sfd and w.sfd >= 0 then core.pump_remove(w.sfd) end
  st.fds_dirty = true
end

local worker_count = 0           -- names the workers PoolWorker-1, -2... (as Python does)

-- Before workers are forked: two young collections, so that every object the workers
-- inherit is old for good. Lua 5.4's generational collector re-marks the objects that
-- turned old in its previous cycle at its next one; a worker forked between the two
-- marked them all at its first collection, writing into every page of the heap it
-- shares with the parent: each a copy-on-write fault with a TLB flush (509 faults for a
-- 2 MiB heap; after two young steps, 30). A fresh Pool(8) worker took ~90 such faults in
-- the middle of a map of tiny tasks. The steps cost the parent a young collection each,
-- not a full one. (Nothing when the program stopped the collector; spawn and forkserver
-- workers share no heap.)
local function age_heap(st)
  if st.method == "spawn" or st.method == "forkserver" or not collectgarbage("isrunning") then
    return
  end
  collectgarbage("step", 0)
  collectgarbage("step", 0)
end

function spawn(st)
  local a, b = Pipe()
  local w = {conn = a, inflight = dq_new(), known = {}, known_order = dq_new(), sent = 0,
             ahead_bytes = 0, queued_est = 0, unknown = 0, busy_since = 0, timed_done = 0,
             owed = 0, got = {}, extra = 0, cpu_seen = false, cpu_was = false}
  local okr, ring = pcall(core.ring_new)   -- re-raised
  if not okr then a:close(); b:close(); error(ring, 0) end
  w.ring = ring
  if #st.free_slots == 0 then
    -- more workers than slots (killed ones not yet reaped): a new block of slots
    local block = core.array_new("q", st.processes, false)
    for i = st.processes, 1, -1 do st.free_slots[#st.free_slots + 1] = {block, i} end
  end
  local slot = table.remove(st.free_slots)
  local stamps, i = slot[1], slot[2]
  stamps[i] = IDLE40
  w.slot = slot
  local ok, h
  if st.method == "spawn" or st.method == "forkserver" then
    -- a fresh interpreter (or a fork of the clean forkserver): it gets its end of the
    -- Pipe, its stamps slot and the pool's settings as args; n counts them, as the nils
    -- (no initializer, no maxtasks) make holes and # of the decoded table may stop at the
    -- first (the stamps were lost: a timed task was never seen to start and so never
    -- timed out)
    ok, h = pcall(require("luamp.process")._spawn_call, require("luamp.pool")._spawn_worker,
      {b, ring, st.initializer, st.initargs, st.maxtasks, stamps, i, st.epoch, st.spin, n = 9},
      "worker", st.method)
  else
    ok, h = pcall(core.fork, function() return worker_main(st, a, b, ring, stamps, i) end, "worker")   -- re-raised
  end
  b:close()
  if not ok then
    st.free_slots[#st.free_slots + 1] = slot
    a:close(); ring:close(); error(h, 0)
  end
  w.handle, w.pid, w.cfd, w.sfd = h, h:pid(), a:fileno(), h:sentinel()
  w.efd = ring:doorbell_fd(1)
  w.gknown = global_functions()
  worker_count = worker_count + 1
  w.name = "PoolWorker-" .. worker_count
  if TR.on then
    TR.row(w.pid, w.name)
    TR.instant("start", w.pid)
  end
  st.workers[#st.workers + 1] = w
  w.active = st.active
  join_active(w)
  core.pump_add(w.cfd, st.pump)
  core.pump_add(w.efd, st.pump)
  if w.sfd and w.sfd >= 0 then core.pump_add(w.sfd, st.pump) end
  st.fds_dirty = true
  return w
end

local function remove_worker(st, w)
  for i, x in ipairs(st.workers) do
    if x == w then table.remove(st.workers, i); break end
  end
  unregister(st, w)
  w.dead = true
  if w.slot then st.free_slots[#st.free_slots + 1] = w.slot; w.slot = nil end
  if TR.on then TR.instant("exit", w.pid) end
  U.pcall(w.conn.close, w.conn)
  w.ring:close()
  U.pcall(w.handle.close, w.handle)   -- frees the pidfd once reaped
end

-- The chunks w holds (its queue's entries, and the chunks of its spans beyond their
-- first: see queue_add_all).
local function held_by(w)
  local q = w.inflight
  return q.last - q.first + 1 + w.extra
end

-- Chunks not yet handed out: the rest of job, and at least one per other waiting job.
local function backlog(st, job)
  local n = dq_len(job.retry) + dq_len(st.feed) - 1
  if job.list and not job.exhausted then
    n = n + (job.len - job.pulled + job.chunksize - 1) // job.chunksize
  end
  return n
end

-- Whether job's chunks are pure computation, known or likely: in a pool with more
-- workers than CPUs they then run on at most one busy worker per CPU (tiny_busy), as
-- more would only take turns on the CPUs while each pays its first chunk's costs (its
-- copy of the heap, tables faulted in, a collection through the heap the fork left it).
-- A map of x*x over 1M items on Pool(8) on 2 CPUs cost the workers 130 ms of CPU,
-- against 94 ms on Pool(2), every worker 5 ms for its first chunk of 31,250 items.
-- Known: chunks that are tiny (TINY_CHUNK), or items that are (TINY_ITEM: too short for
-- a system call, let alone a wait). Likely: a list cut into big chunks (lazy_job), before
-- any result of the job has told; a wrong guess costs the other workers one chunk's
-- wait (or STALL_MIN, when results of other chunks come meanwhile).
local function cpu_job(st, job)
  if not st.oversub then return false end
  local fe = job.fe
  local est = fe.est
  if est and est * job.chunksize < TINY_CHUNK then return true end
  if (fe.est_job or 0) >= job.id then return est ~= nil and est < TINY_ITEM end
  return lazy_job(job)
end

-- How many chunks of job may be sent to w now. An idle worker always takes one. A busy
-- one takes more only when they are known to be short: up to PREFETCH_TIME of queued
-- work (topped up once half of it is done, so that one message carries many), or a
-- single long chunk waiting behind the running one while there is work enough for every
-- worker. So the worker does not wait for the parent between chunks, and no chunk waits
-- behind a long task while another worker is idle.
-- (per, left and want depend on the job alone: dispatch_round works them out once per
-- round, with job_want; held is held_by(w).)
local function job_want(st, job)
  local est = job.fe.est
  local sharers = #st.workers
  if st.oversub and cpu_job(st, job) then sharers = math.min(sharers, st.ncpu) end
  if not est then return nil, nil, nil, sharers end
  local per = math.max(est * job.chunksize, 1e-7)
  -- a fair share at most: the estimate comes from earlier chunks and may be far off
  -- (shared among as many workers as run at once: see tiny_busy)
  local left = backlog(st, job)
  local want = math.min(math.floor(PREFETCH_TIME / per), -(-left // sharers))
  -- Until a result of this job has come back, the estimate is only a hint (from earlier
  -- jobs of the function, whose arguments may cost far less: a warm-up map over small
  -- numbers made 5 ms tasks look like 50 us ones): a worker holds at most two of its
  -- chunks meanwhile, the second only as the one waiting behind a long chunk. A fair
  -- share handed out on a wrong hint cannot be taken back: half of 16 such tasks went to
  -- one worker up front, and the map waited for it while the other sat idle.
  -- (fe.est_job: the latest job whose result went into the estimate; ids only grow)
  if want > 1 and (job.fe.est_job or 0) < job.id then want = 1 end
  return per, left, want, sharers
end

local function capacity(st, w, held, per, left, want, sharers)
  if w.dead or w.stopping or w.sending or w.broken or w.timeout_kill then return 0 end
  local room = MAX_AHEAD - held
  if st.maxtasks then room = math.min(room, st.maxtasks - w.sent) end
  if room <= 0 then return 0 end
  if not per then return held == 0 and 1 or 0 end
  if held == 0 then return math.max(1, math.min(room, want)) end
  if w.unknown > 0 or w.ahead_bytes >= AHEAD_BYTES then return 0 end
  if want >= 2 then
    local budget = PREFETCH_TIME - w.queued_est - (now() - w.busy_since)
    local n = math.min(room, want, math.floor(budget / per))
    return n >= want // 2 and n or 0
  end
  if held == 1 and left >= 2 * sharers then return 1 end
  return 0
end

-- Bookkeeping of a worker's queue: the work it holds, as far as it is known.
-- An entry of the queue is a chunk, or a span: the consecutive chunks of one run
-- (produce_run) in one table, span of them, total items, n in each but the last (a
-- run of 20,000 tasks of chunk size 1 made and took back a table per task: most of the
-- parent's work). Its est and ahead are those of one chunk. The chunks a worker holds
-- are the entries plus w.extra (the spans' chunks beyond their first).
-- Adds chunks to w's queue, with what is known of their work and bytes.
local function queue_add_all(w, chunks)
  local q = w.inflight
  local busy = q.last >= q.first
  if not busy then
    w.busy_since = now()
    join_active(w)
  end
  local last, qe, unknown, ahead = q.last, w.queued_est, w.unknown, w.ahead_bytes
  for i = 1, #chunks do
    local c = chunks[i]
    last = last + 1
    q[last] = c
    local m = c.span or 1
    if m > 1 then w.extra = w.extra + m - 1 end
    local est = c.job.fe.est
    if est then
      local e = est * c.n
      c.est = e
      qe = qe + e * m
    else
      unknown = unknown + m
    end
    local a = busy and (c.run and c.run.size or c.bytes and #c.bytes) or 0   -- (lazy: send_lazy)
    c.ahead = a
    ahead = ahead + a * m
  end
  q.last, w.queued_est, w.unknown, w.ahead_bytes = last, qe, unknown, ahead
end

-- Makes the first chunk of the span at the head of w's queue (if it is one of more
-- than one chunk) an entry of its own, before it.
local function split_head(w)
  local q = w.inflight
  local c = q[q.first]
  if not c or not c.span or c.span < 2 then return end
  local n = c.n
  local x = {job = c.job, k = c.k, first = c.first, n = n, run = c.run, est = c.est,
             ahead = c.ahead}
  c.k, c.first, c.span, c.total = c.k + 1, c.first + n, c.span - 1, c.total - n
  if c.span == 1 then c.n = c.total end
  w.extra = w.extra - 1
  q.first = q.first - 1
  q[q.first] = x
end

local function queue_pop(w)
  split_head(w)
  local c = dq_pop(w.inflight)
  if not c then return nil end
  if c.est then w.queued_est = w.queued_est - c.est else w.unknown = w.unknown - 1 end
  if c.timed then w.timed_done = w.timed_done + c.n end
  if dq_len(w.inflight) == 0 then w.queued_est = 0 end   -- no drift from float sums
  w.busy_since = now()
  w.ahead_bytes = w.ahead_bytes - (c.ahead or 0)
  c.bytes, c.run = nil, nil    -- kept until answered: a chunk of a worker that died is sent again
  return c
end

-- Takes the count chunks a coalesced answer covers off w's queue: consecutive chunks of
-- one map job over consecutive items; returns the first (as {job, k, first}) and the
-- items they hold, or nil (nothing taken: the worker broke the protocol). A span is
-- taken whole, or its first chunks (what is left of it stays at the head).
local function queue_pop_run(w, count)
  local q = w.inflight
  local f = q.first
  local c = q[f]
  if not c or count > held_by(w) then return nil end
  local job, k, nextf = c.job, c.k, c.first
  if job.kind ~= "map" then return nil end
  local items, left, i = 0, count, f
  while left > 0 do
    local x = q[i]
    if x.job ~= job or x.k ~= k or x.first ~= nextf or x.timed then return nil end
    local m = x.span or 1
    if m > left then
      items = items + left * x.n
      left = 0
    else
      local xi = m > 1 and x.total or x.n
      items = items + xi
      nextf, k, left, i = nextf + xi, k + m, left - m, i + 1
    end
  end
  local head = {job = job, k = c.k, first = c.first, n = items}
  local qe, unknown, ahead = w.queued_est, w.unknown, w.ahead_bytes
  left = count
  while left > 0 do
    local x = q[f]
    local m = x.span or 1
    local t = m > left and left or m
    if x.est then qe = qe - x.est * t else unknown = unknown - t end
    ahead = ahead - (x.ahead or 0) * t
    if t == m then
      q[f] = nil
      f = f + 1
      x.bytes, x.run = nil, nil
      if m > 1 then w.extra = w.extra - (m - 1) end
    else
      -- the first t chunks of a span: the rest stays
      x.k, x.first, x.span, x.total = x.k + t, x.first + t * x.n, m - t, x.total - t * x.n
      if x.span == 1 then x.n = x.total end
      w.extra = w.extra - t
    end
    left = left - t
  end
  q.first = f
  if q.first > q.last then qe = 0 end   -- no drift from float sums
  w.queued_est, w.unknown, w.ahead_bytes = qe, unknown, ahead
  w.busy_since = now()
  return head, items
end

local function remember_fn(w, fe, defs)
  if w.known[fe.id] then return defs end
  defs = defs or {}
  defs[#defs + 1] = fe.id
  defs[#defs + 1] = fe.bytes
  w.known[fe.id] = true
  dq_push(w.known_order, fe.id)
  return defs
end

local function evict_fns(w, keep)
  local drops
  while dq_len(w.known_order) > FN_CACHE do
    local id = dq_peek(w.known_order)
    if keep[id] then break end
    dq_pop(w.known_order)
    w.known[id] = nil
    drops = drops or {}
    drops[#drops + 1] = id
  end
  return drops
end

-- A message to worker w: in its ring when it fits, else on the socket behind a marker.
-- follow: bytes of messages that go right after it (see ring.c, place).
local function post(w, data, follow)
  if not w.ring:put(0, data, false, 0, follow) then w.conn:send_bytes(data) end
end

-- The chunks' arguments not inlined follow the message as messages of their own: in the
-- ring when they fit (the worker decodes them where they lie), else on the socket behind
-- a marker; with descriptors always on the socket. chunks: a list, or a single chunk
-- (send_direct).
-- Ends a send to w begun with w.sending = true: a failed send re-raises Interrupted (Ctrl-C
-- wins) and otherwise marks the worker broken; its sentinel will tell, and what it was sent
-- goes with it.
local function send_done(w, ok, err)
  w.sending = false
  if not ok then
    if is_error(err, "Interrupted") then error(err, 0) end
    w.broken = true
  end
end

local function send_message(w, data, chunks)
  local list = chunks.job and {chunks} or chunks
  local follow = 0
  for _, c in ipairs(list) do
    if not c.run and not c.fds and #c.bytes > INLINE_MAX then follow = follow + #c.bytes + 16 end
  end
  post(w, data, follow)
  local conn = w.conn
  for _, c in ipairs(list) do
    if not c.run then
      if c.fds then
        w.ring:put(0, "", true)
        conn:_send(c.bytes, c.fds)
      elseif #c.bytes > INLINE_MAX then
        post(w, c.bytes)
      end
    end
  end
end

-- Sends chunks (a list) to w as one message.
-- The message: {function definitions, functions to drop, a run's encoded arguments (or
-- false), then per chunk: job id, chunk number, function id, mode (the first one plus
-- SPIN_OK when spin), items, and its encoded arguments (false: they follow on the
-- socket)}. A run (chunks from one produce_run, all of this message) is one entry: its
-- first chunk number, its items in all, and minus its chunk size; the worker cuts it
-- into the same chunks.
local function send_chunks(st, w, chunks, spin)
  local msg = {false, false, false}
  local defs
  local keep = {}
  local first = chunks[1]
  if first.run then
    local job = first.job
    local fe = job.fe
    keep[fe.id] = true
    defs = send_globals(w, job, defs)
    defs = remember_fn(w, fe, defs)
    local last = chunks[#chunks]
    msg[3] = first.run.bytes
    msg[4], msg[5], msg[6], msg[7], msg[8], msg[9] =
      job.id, first.k, fe.id, first.run.mode,
      last.first + (last.span and last.total or last.n) - first.first, -job.chunksize
  else
    for _, c in ipairs(chunks) do
      local job = c.job
      local fe = job.fe
      keep[fe.id] = true
      defs = send_globals(w, job, defs)
      defs = remember_fn(w, fe, defs)
      local m = #msg
      c.timed = job.timeout ~= nil
      msg[m + 1], msg[m + 2], msg[m + 3], msg[m + 4], msg[m + 5], msg[m + 6] =
        job.id, c.k, fe.id, c.timed and job.mode + TIMED or job.mode, c.n,
        not c.fds and #c.bytes <= INLINE_MAX and c.bytes
    end
  end
  msg[1] = defs or false
  msg[2] = evict_fns(w, keep) or false
  if spin then msg[7] = msg[7] + SPIN_OK end
  queue_add_all(w, chunks)
  local nchunks = #chunks
  for i = 1, nchunks do
    local m = chunks[i].span
    if m then nchunks = nchunks + m - 1 end
  end
  w.sent = w.sent + nchunks
  local data = dumps(msg)
  w.sending = true
  local ok, err = pcall(send_message, w, data, chunks)   -- Interrupted re-raised
  send_done(w, ok, err)
end

-- Sends chunk c of a lazy_job to w, as a message of its own followed by its arguments,
-- encoded from the caller's list straight into the ring (ring:put_args). An item that
-- cannot be encoded fails the map, as produce's encoding would have (the worker still
-- gets the functions it is now known to hold).
local function send_lazy(st, w, c, spin)
  local job = c.job
  local fe = job.fe
  local defs = send_globals(w, job, nil)
  defs = remember_fn(w, fe, defs)
  local drops = evict_fns(w, {[fe.id] = true})
  local data = dumps({defs or false, drops or false, false, job.id, c.k, fe.id,
                      spin and job.mode + SPIN_OK or job.mode, c.n, false})
  local busy = w.inflight.last >= w.inflight.first
  local last = c.first + c.n - 1
  w.sending = true
  local ok, pre_in, len, bytes, fds = pcall(w.ring.put_args, w.ring, 0, data, job.list, c.first, last)
  if not ok and is_error(pre_in, "Serialize") then
    -- nothing was put
    local err = pre_in
    local okp, e2 = pcall(post, w, dumps({defs or false, drops or false, false}))
    send_done(w, okp, e2)
    job_finish(st, job, false, item_error(core.table_slice(job.list, c.first, last), c.n, c.first, err))
    return
  end
  queue_add_all(w, {c})
  w.sent = w.sent + 1
  if ok then
    if busy then
      c.ahead = len
      w.ahead_bytes = w.ahead_bytes + len
    end
    if not pre_in or bytes then
      ok, pre_in = pcall(function()
        if not pre_in then w.conn:send_bytes(data) end
        if bytes then w.conn:_send(bytes, fds) end
      end)
      if fds then fds:close() end
    end
  end
  send_done(w, ok, pre_in)
end

-- Whether worker w's process is running or waiting for a CPU (state R in /proc), asked
-- at most every STALL_MIN / 4. A worker long past its chunk's estimate may be blocked
-- (a task that waits: another worker should take the work) or only off its CPU (a loaded
-- machine: one more worker would only take a CPU from it). Before, the second looked
-- like the first: under load 10, a 1M map on Pool(8) woke 3-8 workers, not 2. Not
-- known (no /proc): blocked, as before.
local function on_cpu(w, t)
  if w.cpu_seen and t - w.cpu_seen < STALL_MIN / 4 then return w.cpu_was end
  local running = false
  local f = io.open("/proc/" .. w.pid .. "/stat")
  if f then
    local line = f:read("l")
    f:close()
    running = line ~= nil and line:match(".*%) (%a)") == "R"
  end
  w.cpu_seen, w.cpu_was = t, running
  return running
end

-- With more workers than CPUs, chunks of a cpu_job go to at most one busy worker per
-- CPU: another worker woken for them would only take a CPU from one that is running,
-- fault in its own pages, and make every hand-over a wake-up (Pool(8) ran
-- tiny tasks at 0.57x the rate of Pool(2) on 2 CPUs). A worker whose chunk runs far past
-- its estimate (blocked, or a long task) does not count, unless it has answered (this
-- process is behind, not the worker) or the kernel says it is running or ready to run
-- (on_cpu): the next one is woken then.
local function tiny_busy(st)
  local busy, t, ncpu = 0, nil, st.ncpu
  local ws = st.active
  for i = 1, #ws do
    local w = ws[i]
    local q = w.inflight
    if q.first <= q.last and not w.dead then
      -- (called for every round of a dispatch: no call that can be spared)
      t = t or now()
      local stall = 4 * w.queued_est
      if stall < STALL_MIN then stall = STALL_MIN end
      if t - w.busy_since < stall or w.ring:has(1) or on_cpu(w, t) then
        busy = busy + 1
        if busy >= ncpu then return true end
      end
    end
  end
  return false
end

-- Hands out chunks while some worker can take them: each goes to the worker holding
-- the least; a batch carries further chunks of the same function when they are short.
local function dispatch_round(st)
  local job = feed_head(st)
  if not job then return false end
  local best, cap, best_held
  local per, left, want, sharers = job_want(st, job)
  -- (fewer sharers than workers: a cpu_job of an oversubscribed pool, whose chunks go to
  -- at most one busy worker per CPU, so its workers may spin as in a pool that fits)
  local spin_ok = sharers < #st.workers
  local only_busy = spin_ok and tiny_busy(st)
  local ws = only_busy and st.active or st.workers
  for i = 1, #ws do
    local w = ws[i]
    if not only_busy or w.inflight.first <= w.inflight.last then
      -- (a worker holding as many as the best so far cannot be chosen: its capacity is
      -- not worked out; and none holds fewer than none)
      local held = held_by(w)
      if not best or held < best_held then
        local c = capacity(st, w, held, per, left, want, sharers)
        if c > 0 then
          best, cap, best_held = w, c, held
          if held == 0 then break end
        end
      end
    end
  end
  if not best then return false end
  if cap >= 2 then
    local run = produce_run(st, job, cap)
    if run then
      send_chunks(st, best, run, spin_ok)
      return true
    end
  end
  local batch, bytes = {}, 0
  while #batch < cap and bytes < AHEAD_BYTES do
    local j = feed_head(st)
    if not j or (j ~= job and (j.fe ~= job.fe or j.chunksize ~= job.chunksize)) then break end
    if #batch > 0 and lazy_job(j) then break end   -- (a lazy chunk goes alone)
    local c = produce(st, j)
    if c and c.lazy then
      send_lazy(st, best, c, spin_ok)
      return true
    end
    if c then
      batch[#batch + 1] = c
      bytes = bytes + #c.bytes
    end
  end
  if #batch > 0 then send_chunks(st, best, batch, spin_ok) end
  return true
end

local function dispatch_rounds(st)
  while dispatch_round(st) do end
end

function dispatch(st)
  if st.dispatching or st.state == "TERMINATE" or st.broken then return end
  if st.feed.first > st.feed.last then return end
  st.dispatching = true
  local ok, err = pcall(dispatch_rounds, st)   -- re-raised
  st.dispatching = false
  if not ok then error(err, 0) end
end

-- Every unfinished job fails with err; undispatched work is dropped.
local function fail_all(st, err)
  local list = {}
  for _, job in pairs(st.jobs) do list[#list + 1] = job end
  table.sort(list, function(a, b) return a.id < b.id end)
  for _, job in ipairs(list) do
    if job.kind == "imap" then
      job.failed = err
      job.exhausted = true
      job.retry = dq_new()
      st.jobs[job.id] = nil
      st.njobs = st.njobs - 1
    else
      job_finish(st, job, false, err)
    end
  end
  st.feed = dq_new()
end

-- A result message from w (raw bytes, or {the message} decoded in the ring) for chunk c,
-- the head of w's queue.
-- items: the message answers the chunks of a map from c on that hold this many items
-- (coalesced, see worker_loop and queue_pop_run).
local function on_result(st, w, c, data, fds, items)
  -- the chunk's own descriptors are no longer needed: it will not be sent again
  if c.fds then c.fds:close() end
  local ok, msg
  local job = c.job
  if type(data) == "table" then ok, msg = true, data[1]   -- decoded in the ring
  elseif fds then ok, msg = U.pcall(loadx, data, fds)
  elseif not items and c.n >= SCRATCH_MIN and job.kind == "map" and not job.ready then
    -- a big chunk of a map: its results go straight into the map's result table
    -- (msg[5] is then true)
    ok, msg = U.pcall(core.loads_into, data, job.results, c.first, c.n, 5)
  else
    ok, msg = pcall(loads, data)   -- Interrupted re-raised
    if not ok and is_error(msg, "Interrupted") then error(msg, 0) end
  end
  if not ok or type(msg) ~= "table" or msg[1] ~= job.id or msg[2] ~= c.k then
    return false
  end
  local n = c.n
  if items then
    if msg[3] ~= true or type(msg[5]) ~= "table" or msg[7] ~= items then return false end
    n = items
  end
  local fe, dt = c.job.fe, msg[4]
  if math.type(dt) == "float" and n > 0 then
    local per = dt / n
    -- the first result of a list job replaces a hint from earlier jobs (their items may
    -- have cost 100x more or less); later ones, and apply's, are averaged in
    if fe.est and ((fe.est_job or 0) >= job.id or job.kind == "apply") then
      per = fe.est * 0.7 + per * 0.3
    end
    fe.est = per
  end
  fe.est_job = job.id
  if TR.on then
    -- the worker's start time (one monotonic clock for all processes), else an estimate
    local t0 = math.type(msg[6]) == "float" and msg[6] or now() - (tonumber(dt) or 0)
    TR.span(c.job.label or "task", w.pid, t0, tonumber(dt) or 0, c.job.id, c.k, c.n, msg[3] == true)
  end
  local res = msg[5]
  if items then
    -- (a map: its chunks are one stretch of items, recorded at once)
    chunk_ok(st, c.job, {first = c.first, n = n}, res)
  elseif msg[3] then chunk_ok(st, c.job, c, res)
  else chunk_failed(st, c.job, c, remote_error(msg[5])) end
  return true
end

local function on_init_message(st, w, data)
  local ok, msg = U.pcall(loads, data)
  if ok and msg == true then return end
  local err = remote_error(ok and msg or {"garbled initializer report"}, "pool initializer raised: ")
  if not st.broken then
    st.broken = err
    fail_all(st, err)
    -- nothing more will run: the healthy workers are told to go
    for _, x in ipairs(st.workers) do
      if not x.stopping then
        x.stopping = true
        U.pcall(post, x, dumps(false))
      end
    end
  end
end

-- w's next record in its ring (as ring:take): the answer to a big chunk of a map is
-- decoded where it lies, its results straight into the map's result table (msg[5] is then
-- true), and comes boxed ({msg}: told from raw bytes).
local function take_answer(w)
  local c = w.init_seen and not w.timeout_kill and w.inflight[w.inflight.first]
  local job = c and c.job
  if job and c.n >= SCRATCH_MIN and job.kind == "map" and not job.ready then
    local m, tag, dec = w.ring:take_decoded(1, job.results, c.first, c.n, 5)
    if dec then return {m}, tag end
    return m, tag
  end
  return w.ring:take(1)
end

-- The next message from w: from its ring, or from the socket where the ring held a marker
-- for it (w.owed counts markers taken whose message has not been read); nil when there is
-- none now, or nil, "garbled" for a ring that makes no sense. look_socket: the socket was
-- seen readable (or w ended), so with no marker owed it can only hold EOF — which the
-- receive raises — or a message no marker announced (garbled). The ring is looked at
-- again after the socket's readiness: the marker is published before the socket send.
-- taken: the caller took from the ring already, and m, tag are what it got.
local function next_message(w, look_socket, taken, m, tag)
  if not taken then
    if w.owed > 0 then
      local data, fds = w.conn:_recv_bytes_nowait()
      if data == nil then return nil end
      w.owed = w.owed - 1
      return data, fds, w.owed_tag
    end
    m, tag = take_answer(w)
  end
  if m then return m, nil, tag end
  local garbled = tag
  if m == false then
    w.owed, w.owed_tag = 1, tag
    return next_message(w, look_socket)
  end
  if garbled then return nil, "garbled" end
  if look_socket and w.conn:_ready_now() then
    if w.ring:has(1) then return next_message(w, look_socket) end
    local data, fds = w.conn:_recv_bytes_nowait()
    if data ~= nil then
      if fds then fds:close() end
      return nil, "garbled"
    end
  end
  return nil
end

-- Reads every message w has for us; results are taken off w's queue first and decoded
-- after the freed worker has been given new work. The readiness that brought us here is
-- only a hint: between a poll and this read other pumps may have run (any wait runs them,
-- and a pump of this pool run from inside another pool's pump can read this very
-- connection), so every receive is one that returns nothing when no message is there.
local function drain_messages(st, w, look_socket)
  -- (w's list, reused: drain is not re-entered for one worker; emptied as it is used,
  -- and what an error left in it is dropped, as a list of its own would be)
  local got, interrupted = w.got, nil
  if next(got) ~= nil then got = {}; w.got = got end
  local ring = w.ring
  while not w.dead do
    -- a record in the ring, or an empty ring with nothing else to look at, needs no
    -- protected call (a ring is closed only with its worker dead)
    local ok, data, fds, tag
    local m, t
    if w.owed == 0 then m, t = take_answer(w) end
    if m or (m == nil and t == nil and not look_socket and w.owed == 0) then
      ok, data, tag = true, m, t
    else
      ok, data, fds, tag = pcall(next_message, w, look_socket, w.owed == 0, m, t)   -- Interrupted re-raised below
    end
    if ok and data == nil then
      if fds == "garbled" then w.garbled = true end
      break
    end
    if not ok then
      -- (the results already taken are recorded first; the receive resumes next time)
      if is_error(data, "Interrupted") then interrupted = data; break end
      if not w.dead then
        w.eof = true
        st.fds_dirty = true
        core.pump_remove(w.cfd)
      end
      break
    end
    if w.timeout_kill then
      -- written off (timeout_kill): what it still sends is dropped
      if fds then fds:close() end
    elseif not w.init_seen then
      w.init_seen = true
      if fds then fds:close() end
      on_init_message(st, w, data)
    else
      -- the tag: how many chunks the message answers (coalesced, see worker_loop)
      local c, items
      if tag and tag > 1 then c, items = queue_pop_run(w, tag) else c = queue_pop(w) end
      if not c then
        if fds then fds:close() end
        w.garbled = true
        break
      end
      local m = #got
      got[m + 1], got[m + 2], got[m + 3], got[m + 4] = c, data, fds or false, items or false
    end
  end
  local n = #got
  if n > 0 then dispatch(st) end
  for i = 1, n, 4 do
    local c, data, fds, items = got[i], got[i + 1], got[i + 2] or nil, got[i + 3] or nil
    got[i], got[i + 1], got[i + 2], got[i + 3] = nil, nil, nil, nil
    if not on_result(st, w, c, data, fds, items) then
      w.garbled = true
      if TR.on then TR.instant("WorkerLost", w.pid, {malformed = true}) end
      chunk_failed(st, c.job, c, core.error("WorkerLost",
        "worker " .. w.pid .. " sent a malformed result", {pid = w.pid}))
    end
  end
  if interrupted then error(interrupted, 0) end
end

local function drain(st, w, look_socket)
  -- not re-entered: a receive waiting for the rest of a message runs other pumps
  if w.dead or w.reading then return end
  if w.eof and not w.ring:has(1) then return end
  w.reading = true
  local ok, err = pcall(drain_messages, st, w, look_socket)   -- re-raised
  w.reading = false
  if not ok then error(err, 0) end
  local code = w.ended_code
  if code ~= nil then
    -- it ended while we were reading: now that all it sent is in, settle its account
    w.ended_code = nil
    worker_ended(st, w, code)
    return
  end
  if w.garbled and not w.killed then
    -- a worker that breaks the protocol cannot be trusted with more work
    w.killed = true
    U.pcall(w.handle.signal, w.handle, core.SIGKILL)
  end
end

-- Task `item` of chunk c ran past its job's timeout and its worker was killed: that
-- task alone fails with Timeout; the other tasks of the chunk go back to the queue as
-- chunks of their own (those before it run a second time: their results died with the
-- worker).
local function timed_out(st, c, item, pid)
  local job = c.job
  if job.ready or job.cancelled or job.failed then return end
  local pos = c.first + item - 1
  local err = core.error("Timeout", string.format("%s ran longer than its limit of %g s (worker %d killed)",
    job.kind == "apply" and "the task" or "task " .. pos, job.timeout, pid))
  if c.n > 1 then
    -- encoded by this process; with the descriptors of the luamp objects it holds, if any
    local args = c.fds and loadx(c.bytes, c.fds) or loads(c.bytes)
    local pieces = {}
    for _, r in ipairs {{1, item - 1}, {item + 1, c.n}} do
      local a, b = r[1], r[2]
      if b >= a then
        job.next_k = job.next_k + 1
        local bytes, fds = dumpx(table.move(args, a, b, 1, {}))
        pieces[#pieces + 1] = {job = job, k = job.next_k, first = c.first + a - 1,
          n = b - a + 1, bytes = bytes, fds = fds}
      end
    end
    for i = #pieces, 1, -1 do dq_push_front(job.retry, pieces[i]) end
    feed_job(st, job, true)
  end
  if job.kind == "apply" then
    job.done_items = 1
    job_finish(st, job, false, err)
  elseif job.kind == "map" then
    -- the map raises the Timeout of its first timed-out task once all the others are done
    if not job.timeout_pos or pos < job.timeout_pos then job.timeout_err, job.timeout_pos = err, pos end
    job.done_items = job.done_items + 1
    if job.done_items >= job.total then job_finish(st, job, false, job.timeout_err) end
  else
    imap_mark_error(job, {first = pos, n = 1}, err)
  end
end

-- The chunks still queued on worker w never started: each goes back to the front of its
-- job's retry queue, in their order, unless its job has ended.
local function requeue_inflight(st, w)
  local rest = {}
  while true do
    split_head(w)   -- (a span goes back chunk by chunk)
    local r = dq_pop(w.inflight)
    if not r then break end
    rest[#rest + 1] = r
  end
  for i = #rest, 1, -1 do
    local r = rest[i]
    local job = r.job
    if not job.ready and not job.cancelled and not job.failed then
      dq_push_front(job.retry, r)
      feed_job(st, job, true)
    end
  end
end

-- Task `item` of chunk c, the head of w's queue, is over its limit: w is killed and
-- written off at once (what it still sends is dropped), so the Timeout is raised now,
-- not when the death is seen; its other chunks never started and go back to the queue.
-- The sentinel reports the death later and the worker is replaced then.
local function timeout_kill(st, w, c, item)
  w.timeout_kill = true
  st.dying = st.dying + 1
  U.pcall(w.handle.signal, w.handle, core.SIGKILL)
  local bytes = c.bytes
  queue_pop(w)
  c.bytes = bytes
  requeue_inflight(st, w)
  w.queued_est, w.unknown, w.ahead_bytes = 0, 0, 0
  timed_out(st, c, item, w.pid)
  if c.fds then U.pcall(c.fds.close, c.fds) end   -- it will not be sent again
  -- the replacement starts in the next round (settle), after the Timeout is out, while
  -- the killed one dies
  st.respawn = true
end

-- The parent watches the clock: for each worker whose running chunk has a timeout, the
-- worker's stamp tells which task runs and since when; one over its limit has its
-- worker killed (the sentinel then reports the death: worker_ended). Returns when to
-- look again (nil: no timed task is running).
local function check_timeouts(st)
  local wake, killed
  local ws = st.active   -- (a worker holding a chunk is there)
  for i = 1, #ws do
    local w = ws[i]
    local c = w.inflight[w.inflight.first]
    if c and c.timed and not w.timeout_kill and not w.dead and not w.killed then
      local limit = c.job.timeout
      local item, started
      local word = w.slot[1][w.slot[2]]
      -- the clock is read after the stamp, so that the stamp is never in the future
      local t = now()
      local tus = word & MASK40
      local j = ((word >> 40) - w.timed_done) & SEQMASK
      if tus ~= IDLE40 and j >= 1 and j <= c.n then
        item = j
        local ran = (math.floor((t - st.epoch) * 1e6) - tus) & MASK40
        if ran > MASK40 >> 1 then ran = 0 end   -- (a clock step backwards: not past)
        started = t - ran / 1e6
      end
      local at
      if item then
        at = started + limit
        if t >= at then
          timeout_kill(st, w, c, item)
          killed, at = true, nil
        end
      else
        at = t + math.min(TIMEOUT_POLL, limit / 4)
      end
      if at and (not wake or at < wake) then wake = at end
    end
  end
  return wake, killed
end

-- Replaces workers up to the pool size while there is a reason to.
function repopulate(st)
  if st.state == "TERMINATE" or st.broken then return end
  if st.state == "CLOSE" and st.njobs == 0 then return end
  if #st.workers - st.dying < st.processes then age_heap(st) end
  while #st.workers - st.dying < st.processes do spawn(st) end
end

-- w has ended (exitcode known): its first unanswered chunk fails, the rest go back.
function worker_ended(st, w, code)
  if w.dead or w.ending then return end
  -- its sentinel stays ready while the last messages are read: once is enough (the
  -- connection may not reach EOF soon, a process the worker started may hold it)
  w.ending = true
  drain(st, w, true)
  remove_worker(st, w)
  if w.timeout_kill then st.dying = st.dying - 1 end
  split_head(w)
  local c = dq_pop(w.inflight)
  if TR.on and c then TR.instant("WorkerLost", w.pid, {exitcode = code}) end
  if c then
    local err = st.broken or core.error("WorkerLost", string.format(
      "worker %d died while running a task (exitcode %s)", w.pid, tostring(code)),
      {pid = w.pid, exitcode = code})
    chunk_failed(st, c.job, c, err)
    requeue_inflight(st, w)
  end
  repopulate(st)
  dispatch(st)
end

local function check_ended(st, w)
  if w.dead or w.ending then return end
  local ok, code = U.pcall(w.handle.poll, w.handle)
  if not ok or code == nil then return end
  if w.reading then w.ended_code = code; return end
  worker_ended(st, w, code)
end

local function send_stops(st)
  if st.state ~= "CLOSE" or st.njobs > 0 then return end
  for _, w in ipairs(st.workers) do
    if not w.stopping and not w.dead then
      w.stopping = true
      U.pcall(post, w, dumps(false))
    end
  end
end

function queue_callback(st, fn, ...)
  dq_push(st.callbacks, table.pack(fn, ...))
end

local function callback_handler(e)
  if is_error(e, "Interrupted") then return e end
  return traceback_of(e)
end

local function run_callbacks(st)
  local interrupted
  while true do
    local cb = dq_pop(st.callbacks)
    if not cb then break end
    local ok, err = xpcall(cb[1], callback_handler, unpack(cb, 2, cb.n))   -- Interrupted re-raised
    if not ok then
      if is_error(err, "Interrupted") then
        interrupted = err
      else
        io.stderr:write("luamp: error in a pool callback: ", core.error_text(err), "\n")
        io.stderr:flush()
      end
    end
  end
  if interrupted then error(interrupted, 0) end
end

-- Takes the results that no fd announces: data a send drained into a connection's
-- buffer does not make its fd readable, and a message in a ring needs no doorbell while
-- the pool waits. Whether any worker had some.
local function drain_unannounced(st)
  local any = false
  local ws = st.active
  for i = 1, #ws do
    local w = ws[i]
    -- (a worker that has reported its start and holds no chunk has nothing to say: most
    -- of an oversubscribed pool's workers, while tiny tasks run on one per CPU; what it
    -- sends anyway is seen by the next wait, as set_awake finds it)
    if w and not w.dead and not is_idle(w)
        and (w.ring:has(1) or w.owed > 0 and w.conn:_ready_now()) then
      drain(st, w)
      any = true
    end
  end
  return any
end

-- After anything happened: feed the workers, stop them when closed and idle, callbacks.
-- Every result taken here is followed by a dispatch and the stop check: a last result
-- taken after them left the workers unfed or unstopped, and the pool's next wait slept
-- with nothing left to wake it (a join hung about once in twenty).
local function settle(st)
  if st.respawn then st.respawn = false; repopulate(st) end
  -- (dispatch, send_stops and run_callbacks do nothing when these are empty or RUN)
  if st.feed.last >= st.feed.first then dispatch(st) end
  -- a bounded number of rounds: a worker that keeps answering must not starve callbacks
  for _ = 1, 8 do
    if not drain_unannounced(st) then break end
    if st.respawn then st.respawn = false; repopulate(st) end
    if st.feed.last >= st.feed.first then dispatch(st) end
  end
  if st.state == "CLOSE" then send_stops(st) end
  if st.callbacks.last >= st.callbacks.first then run_callbacks(st) end
end

-- One fd of this pool is ready, or was when a wait looked (called from the pool's waits
-- and as a pump).
function service_fd(st, fd)
  if st.state == "TERMINATE" and #st.workers == 0 then return end
  local w = st.by_fd and st.by_fd[fd]
  if st.fds_dirty or not w then rebuild_fds(st); w = st.by_fd[fd] end
  if not w then return end
  if fd == w.efd then
    -- the doorbell: taken, and set again for the next message unless the pool is
    -- inside one of its waits (see wait_round)
    w.ring:clear_doorbell(1)
    if not st.awake then w.ring:set_sleeping(1, true) end
    drain(st, w)
  elseif fd == w.cfd and not w.eof then
    drain(st, w, true)
    if w.eof then check_ended(st, w) end
  else
    check_ended(st, w)
  end
end

-- ---- waiting -------------------------------------------------------------------------

local function check_owner(st)
  if st.owner ~= core.getpid() then
    raise("Value", "a pool can only be used by the process that created it")
  end
end

-- Ctrl-C (err is Interrupted) during a pool call terminates the pool; the error says so
-- and how to go on, since at the REPL the next line would otherwise meet "Pool not running".
function pool_interrupted(st, err)
  if not is_error(err, "Interrupted") or st.interrupted then return end
  st.interrupted = true
  if type(err.message) == "string" then
    err.message = err.message .. " (the pool was terminated: make a new luamp.Pool to go on)"
  end
  terminate(st)
end

-- Whether the pool is inside one of its own waits: the workers' results then need no
-- doorbell (set_sleeping false); outside, the doorbells ring, for pumps and host loops.
local function set_awake(st, awake)
  st.awake = awake
  local pending
  prune_active(st)
  local ws = st.active
  for i = 1, #ws do
    local w = ws[i]
    if not w.dead and w.ring:set_sleeping(1, not awake) then pending = w end
  end
  return pending
end

local SPIN_EST = 2e-4    -- a worker's head chunk expected within this is spun for

-- Spins briefly for a result when one is due soon from a worker that is running (not
-- asleep); returns the worker that answered, or nil. In a pool with more workers than
-- CPUs only while no more workers hold chunks than there are CPUs (a cpu_job's, see
-- tiny_busy): the pool then runs as one that fits, and a spin takes no CPU from a
-- worker with work waiting for one.
local function spin_for_result(st, timeout)
  local oversub = st.oversub
  if not (st.spin or oversub) then return nil end
  -- (one worker to spin for, the common case, needs no lists)
  local one, rings, by_ring
  local ws = st.active
  local busy, ncpu = 0, st.ncpu
  for i = 1, #ws do
    local w = ws[i]
    local c = w.inflight[w.inflight.first]
    if c and oversub then
      busy = busy + 1
      if busy > ncpu then return nil end
    end
    if c and c.est and c.est < SPIN_EST and not w.dead and w.ring:peer_awake(0) then
      if rings then
        rings[#rings + 1] = w.ring; by_ring[w.ring] = w
      elseif one then
        rings, by_ring = {one.ring, w.ring}, {[one.ring] = one, [w.ring] = w}
      else
        one = w
      end
    end
  end
  if rings then
    local r = core.spin_rings(1, timeout, unpack(rings))
    return r and by_ring[r]
  end
  if one and core.spin_rings(1, timeout, one.ring) then return one end
  return nil
end

local function wait_round(st, fds, timeout, tick)
  local ready
  local w = (timeout == nil or timeout > 0) and spin_for_result(st, timeout)
  if w then
    drain(st, w)
  else
    -- about to sleep: the doorbells ring from now on; a result that came meanwhile
    -- means no sleep
    if set_awake(st, false) then timeout = 0 end
    local ok
    ok, ready = pcall(core.wait_fds, fds, timeout)   -- re-raised
    set_awake(st, true)
    if not ok then error(ready, 0) end
    for _, fd in ipairs(ready) do service_fd(st, fd) end
  end
  if tick then
    for _, w2 in ipairs(st.workers) do check_ended(st, w2) end
  end
  settle(st)
end

-- Waits until something happens in the pool (or the deadline passes) and handles it.
-- A timed-out task was failed just now: its result is ready and nothing is waited for
-- (the replacement worker is started by the next round).
local function after_kill(st)
  dispatch(st)
  run_callbacks(st)
end

-- check_timeouts for a wait: a Ctrl-C met there ends the pool, as one met in the wait.
local function checked_timeouts(st)
  local ok, wake, killed = pcall(check_timeouts, st)   -- re-raised
  if not ok then
    if is_error(wake, "Interrupted") then terminate(st) end
    error(wake, 0)
  end
  return wake, killed
end

local function wait_once(st, deadline)
  local wake, killed = checked_timeouts(st)
  if st.fds_dirty then rebuild_fds(st) end
  local fds = st.fds
  local timeout
  if deadline then timeout = math.max(0, deadline - now()) end
  if wake then timeout = math.max(0, math.min(timeout or math.huge, wake - now())) end
  local tick = st.no_sentinel
  if tick then timeout = math.min(timeout or 0.05, 0.05) end
  if #fds == 0 and not tick and not deadline then
    raise("Value", "pool has no workers left to wait for")
  end
  -- A Ctrl-C met anywhere in the round (in the wait, or raised at any instruction while
  -- the results are handled, which may leave them half recorded) ends the pool.
  local ok, err
  set_awake(st, true)
  if killed then ok, err = pcall(after_kill, st)   -- re-raised
  else ok, err = pcall(wait_round, st, fds, timeout, tick) end   -- re-raised
  -- back to the caller: results from now on ring the doorbell; one that came in the
  -- meantime is announced on it, so whichever wait runs next sees it
  local late = set_awake(st, false)
  if late then late.ring:kick(1) end
  if not ok then
    pool_interrupted(st, err)
    error(err, 0)
  end
end

-- Waits until something happens in any of the pools sts (or the deadline passes), as
-- wait_once does for one.
local function wait_many(sts, deadline)
  if #sts == 1 then return wait_once(sts[1], deadline) end
  local fds, owner, timeout = {}, {}, nil
  if deadline then timeout = math.max(0, deadline - now()) end
  local any_killed
  for _, st in ipairs(sts) do
    local wake, killed = checked_timeouts(st)
    if killed then wake, any_killed = now(), true end
    if wake then timeout = math.max(0, math.min(timeout or math.huge, wake - now())) end
    if st.fds_dirty then rebuild_fds(st) end
    for _, fd in ipairs(st.fds) do fds[#fds + 1] = fd; owner[fd] = st end
    if st.no_sentinel then timeout = math.min(timeout or 0.05, 0.05) end
  end
  if #fds == 0 and not timeout then
    raise("Value", "the pools have no workers left to wait for")
  end
  local ok, err = pcall(function()   -- re-raised
    if any_killed then
      for _, st in ipairs(sts) do after_kill(st) end
      return
    end
    local ready = core.wait_fds(fds, timeout)
    for _, fd in ipairs(ready) do service_fd(owner[fd], fd) end
    for _, st in ipairs(sts) do
      for _, w in ipairs(st.workers) do check_ended(st, w) end
      settle(st)
    end
  end)
  if not ok then
    if is_error(err, "Interrupted") then
      for _, st in ipairs(sts) do U.pcall(terminate, st) end
    end
    error(err, 0)
  end
end

-- Waits until done(arg) is true; returns false on timeout.
local function wait_until(st, done, timeout, arg)
  if timeout ~= nil then U.check_timeout("wait", timeout) end
  local deadline = timeout and now() + math.max(timeout, 0)
  settle(st)
  while not done(arg) do
    if deadline and now() >= deadline then return false end
    wait_once(st, deadline)
  end
  return true
end

-- ---- terminate -----------------------------------------------------------------------

function terminate(st)
  if st.owner ~= core.getpid() then return end
  if st.state == "TERMINATE" and #st.workers == 0 then return end
  st.state = "TERMINATE"
  local closed = core.error("Closed", "the pool was terminated")
  fail_all(st, closed)
  st.callbacks = dq_new()
  local ws = {}
  for i, w in ipairs(st.workers) do ws[i] = w end
  -- a Ctrl-C on the way is raised once every worker is gone (pcalls re-raise it below)
  local interrupted
  local function keep(ok, e, ...)
    if not ok and is_error(e, "Interrupted") then interrupted = interrupted or e end
    return ok, e, ...
  end
  for _, w in ipairs(ws) do
    unregister(st, w)
    keep(pcall(w.handle.signal, w.handle, core.SIGTERM))
  end
  local deadline = now() + TERM_GRACE
  for _, w in ipairs(ws) do
    local left = math.max(0, deadline - now())
    local ok, code = keep(pcall(w.handle.wait, w.handle, left))
    if not ok and is_error(code, "Interrupted") then ok, code = true, nil end
    if ok and code == nil then
      keep(pcall(w.handle.signal, w.handle, core.SIGKILL))
      keep(pcall(w.handle.wait, w.handle, 5))
    end
  end
  for _, w in ipairs(ws) do keep(pcall(remove_worker, st, w)) end
  if interrupted then error(interrupted, 0) end
end

-- ---- AsyncResult ---------------------------------------------------------------------

local AsyncResult = {}
AsyncResult.__index = AsyncResult
AsyncResult.__name = "luamp.AsyncResult"

-- A result or iterator object holds its job under a key only this file has (a weak
-- table from objects to jobs would cost the collector an ephemeron pass per result).
local JOB = setmetatable({}, {__name = "luamp.pool.job"})

local function job_ready(job) return job.ready end

function AsyncResult:ready()
  return self[JOB].ready == true
end

function AsyncResult:wait(timeout)
  local job = self[JOB]
  if job.ready then return end
  check_owner(job.st)
  wait_until(job.st, job_ready, timeout, job)
end

-- For luamp.wait: the fds whose readiness may make this result ready (its pool's
-- connections and sentinels), or nil when it is ready. The waiter then runs the pool
-- through luamp.poll() and asks ready() again.
function AsyncResult:_wait_fds()
  local job = self[JOB]
  if job.ready then return nil end
  local st = job.st
  check_owner(st)
  settle(st)
  if job.ready then return nil end
  if st.fds_dirty then rebuild_fds(st) end
  return st.fds
end

function AsyncResult:get(timeout)
  local job = self[JOB]
  if not job.ready then
    check_owner(job.st)
    if not wait_until(job.st, job_ready, timeout, job) then
      if TR.on then TR.instant("Timeout", core.getpid(), {job = job.id, timeout = timeout}) end
      raise("Timeout", string.format("result not ready after %g s", timeout))
    end
  end
  if not job.ok then error(job.value, 0) end
  if job.kind == "apply" then return unpack(job.value, 1, job.value.n) end
  return job.value
end

-- A task not yet handed to a worker is dropped (its get raises Closed, no callback
-- runs); one a worker holds counts as started, as in concurrent.futures, where the
-- tasks a process pool has queued to its workers are already running.
function AsyncResult:cancel()
  local job = self[JOB]
  if job.ready or job.pulled > 0 then return false end
  local st = job.st
  if st.owner ~= core.getpid() or st.state == "TERMINATE" then return false end
  job.cancelled = true
  job.exhausted = true
  job.retry = dq_new()
  job.ready, job.ok = true, false
  job.value = core.error("Closed", "the task was cancelled")
  finish_count = finish_count + 1
  job.finished = finish_count
  st.jobs[job.id] = nil
  st.njobs = st.njobs - 1
  job.progress = nil
  settle(st)   -- a closed pool with nothing left stops its workers
  return true
end

U.async_result_methods(AsyncResult, JOB)

-- ---- IMapIterator --------------------------------------------------------------------

local IMap = {}
IMap.__index = IMap
IMap.__name = "luamp.IMapIterator"

local function imap_take(job)
  if job.ordered then
    local pos = job.yielded + 1
    local v = job.buf[pos]
    if v == nil then return false end
    job.buf[pos] = nil
    if getmetatable(v) == FAILED then
      job.yielded = job.yielded + v.skip
      job.consumed = job.consumed + v.skip
      return true, nil, nil, v.err
    end
    job.yielded = pos
    job.consumed = job.consumed + 1
    if v == NIL then v = nil end
    return true, v, pos
  end
  local v = dq_pop(job.uq)
  if v == nil then return false end
  if getmetatable(v) == FAILED then
    job.yielded = job.yielded + v.skip
    job.consumed = job.consumed + v.skip
    return true, nil, nil, v.err
  end
  local pos = dq_pop(job.uq)
  job.yielded = job.yielded + 1
  job.consumed = job.consumed + 1
  if v == NIL then v = nil end
  return true, v, pos
end

local function imap_finished(job)
  return job.exhausted and dq_len(job.retry) == 0 and job.yielded >= job.pulled
end

local function imap_end(st, job)
  if job.ended then return end
  job.ended = true
  if st.jobs[job.id] then
    st.jobs[job.id] = nil
    st.njobs = st.njobs - 1
  end
  if job.progress then
    progress_draw(job.progress, job.done_items, true, not imap_finished(job) and "stopped" or nil)
    job.progress = nil
  end
end

-- it:next([timeout]) -> value, input index; nothing at the end. Raises Timeout, the
-- error of a task (Remote, WorkerLost) at its place, or the input iterator's error.
function IMap:next(timeout)
  local job = self[JOB]
  local st = job.st
  if job.ended then return end
  check_owner(st)
  local deadline = timeout and now() + math.max(timeout, 0)
  U.check_timeout("next", timeout)
  while true do
    local got, v, pos, err = imap_take(job)
    if got then
      settle(st)   -- the window moved: more input may go out
      if err ~= nil then error(err, 0) end
      return v, pos
    end
    if job.failed then imap_end(st, job); error(job.failed, 0) end
    if imap_finished(job) then
      imap_end(st, job)
      settle(st)
      if job.input_error then error(job.input_error[1], 0) end
      return
    end
    if deadline and now() >= deadline then
      if TR.on then TR.instant("Timeout", core.getpid(), {timeout = timeout}) end
      raise("Timeout", string.format("no result within %g s", timeout))
    end
    wait_once(st, deadline)
  end
end

IMap.__call = function(self) return self:next() end

-- Leaving a for loop early (break, error) cancels what is left.
IMap.__close = function(self)
  local job = self[JOB]
  if job.ended then return end
  job.cancelled = true
  job.exhausted = true
  job.retry = dq_new()
  imap_end(job.st, job)
end

IMap.__gc = IMap.__close

IMap.__tostring = function(self)
  local job = self[JOB]
  return string.format("<IMapIterator%s done=%d>", job.ordered and "" or " unordered", job.yielded)
end

-- ---- Pool ----------------------------------------------------------------------------

local Pool = {}
local Pool_mt = {__index = Pool, __name = "luamp.Pool", __luamp_nosend = true}
local S = setmetatable({}, {__mode = "k"})   -- Pool object -> state
local live_pools = setmetatable({}, {__mode = "k"})   -- state -> true, for active_children

local function state_of(self)
  local st = S[self]
  if not st then raise("Value", "not a Pool") end
  check_owner(st)
  return st
end

local function check_running(st)
  if st.broken then error(st.broken, 0) end
  if st.state ~= "RUN" then
    if st.interrupted then
      raise("Value", string.format("Pool not running: Ctrl-C terminated it; make a new one, e.g. pool = luamp.Pool(%d)", st.processes))
    end
    raise("Value", "Pool not running")
  end
end

local function new_job(self, st, kind, f, mode)
  st.next_job = st.next_job + 1
  -- (the fields an apply job gets in its life are named here, those set later as nil:
  -- its table is made at its final size, 16, not grown and rehashed as they come)
  local job = {
    st = st, id = st.next_job, kind = kind, mode = mode, fe = func_entry(st, f),
    pulled = 0, next_k = 0, done_items = 0, retry = dq_new(),
    chunksize = nil, abytes = nil, exhausted = nil, ready = nil, ok = nil, value = nil,
    finished = nil,
  }
  local globals = changed_globals(st, f)
  if globals then job.globals = globals end
  if TR.on then job.label = TR.label(f) end
  st.jobs[job.id] = job
  st.njobs = st.njobs + 1
  return job
end

-- A single task with nothing queued before it goes straight to an idle worker (what
-- dispatch would do, without looking through the feed): what produce, send_chunks and
-- queue_add_all do for it, without their lists.
local function send_direct(st, job)
  local maxtasks = st.maxtasks
  local ws = st.workers
  for i = 1, #ws do
    local w = ws[i]
    -- (what capacity says of an idle worker)
    if w.inflight.first > w.inflight.last and not (w.dead or w.stopping or w.sending
        or w.broken or w.timeout_kill) and not (maxtasks and w.sent >= maxtasks) then
      local fe = job.fe
      local defs = remember_fn(w, fe, send_globals(w, job, nil))
      local drops = false
      if dq_len(w.known_order) > FN_CACHE then drops = evict_fns(w, {[fe.id] = true}) or false end
      local bytes, fds = job.abytes, job.afds
      job.abytes, job.afds = nil, nil
      job.exhausted, job.pulled, job.next_k = true, 1, 1
      local timed = job.timeout ~= nil
      local est = fe.est
      local c = {job = job, k = 1, first = 1, n = 1, bytes = bytes, timed = timed, est = est,
                 ahead = 0}   -- (8 fields: the size of its table)
      if fds then c.fds = fds end
      local q = w.inflight
      q.last = q.last + 1
      q[q.last] = c
      join_active(w)
      w.busy_since = now()
      if est then w.queued_est = w.queued_est + est else w.unknown = w.unknown + 1 end
      w.sent = w.sent + 1
      local inline = not fds and #bytes <= INLINE_MAX and bytes
      local msg = st.apply_msg
      msg[1], msg[2], msg[4], msg[5], msg[6], msg[7], msg[8], msg[9] =
        defs or false, drops, job.id, 1, fe.id, timed and APPLY + TIMED or APPLY, 1, inline
      local data = dumps(msg)
      msg[1], msg[2], msg[9] = false, false, false
      w.sending = true
      local ok, err = pcall(send_message, w, data, c)   -- Interrupted re-raised
      send_done(w, ok, err)
      return true
    end
  end
  return false
end

local function submit(st, job)
  if job.kind == "apply" and st.feed.first > st.feed.last and not st.dispatching
      and st.state == "RUN" and not st.broken then
    st.dispatching = true
    local ok, sent = pcall(send_direct, st, job)   -- re-raised
    st.dispatching = false
    if not ok then error(sent, 0) end
    if sent then return end
  end
  feed_job(st, job)
  dispatch(st)
end

local sequence_len = U.sequence_len

local call_options = U.call_options

local function check_chunksize(what, cs)
  if cs ~= nil and (math.type(cs) ~= "integer" or cs < 1) then
    raise("Value", what .. ": chunksize must be a positive integer")
  end
  return cs
end

local function check_fn_opt(what, name, v)
  if v ~= nil then check_callable(v, what .. ": " .. name) end
  return v
end

local function check_task_timeout(what, t, st)
  if t ~= nil and (type(t) ~= "number" or not (t > 0)) then
    raise("Value", what .. ": timeout must be a positive number of seconds")
  end
  return t
end

local map_known = {chunksize = true, callback = true, error_callback = true, progress = true,
                   timeout = true}

local function map_job(self, what, f, list, opts, mode)
  local st = state_of(self)
  check_running(st)
  check_callable(f, what)
  opts = call_options(what, opts, map_known)
  check_chunksize(what, opts.chunksize)
  check_task_timeout(what, opts.timeout, st)
  if type(list) == "function" then
    -- map needs the length: the input is taken now, and its errors surface here as-is
    local items, n = {}, 0
    for v in list do n = n + 1; items[n] = v end
    list = items
    list.n = n
  end
  local len = sequence_len(list, what)
  if mode == STAR then
    for i = 1, len do
      if type(list[i]) ~= "table" then
        raise("Value", string.format("%s: item %d is not an argument list", what, i))
      end
    end
  end
  local job = new_job(self, st, "map", f, mode)
  job.list, job.len, job.total = list, len, len
  local cs = opts.chunksize
  if not cs then
    -- as Python computes it: about four chunks per worker
    local div = st.processes * 4
    cs = math.max(1, len // div + (len % div > 0 and 1 or 0))
  end
  job.chunksize = cs
  job.timeout = opts.timeout
  job.results = core.table_new(len)
  job.results.n = len
  job.callback = check_fn_opt(what, "callback", opts.callback)
  job.error_callback = check_fn_opt(what, "error_callback", opts.error_callback)
  if opts.progress then job.progress = progress_new(len) end
  local res = setmetatable({[JOB] = job}, AsyncResult)
  if len == 0 then
    job_finish(st, job, true, job.results)
    run_callbacks(st)
    return res
  end
  submit(st, job)
  return res
end

local apply_known = {callback = true, error_callback = true, timeout = true}
local EMPTY = {}

function Pool:apply_async(f, args, opts)
  local st = state_of(self)
  check_running(st)
  check_callable(f, "apply_async")
  if args ~= nil and type(args) ~= "table" then raise("Value", "apply_async: args must be a table") end
  if type(opts) == "function" then opts = {callback = opts} end
  local cb, ecb, timeout
  if opts ~= nil then
    opts = call_options("apply_async", opts, apply_known)
    cb = check_fn_opt("apply_async", "callback", opts.callback)
    ecb = check_fn_opt("apply_async", "error_callback", opts.error_callback)
    timeout = check_task_timeout("apply_async", opts.timeout, st)
  end
  -- encoded now: changes the caller makes to args afterwards do not reach the task, and
  -- an argument that cannot cross is reported here
  local abytes, afds = dumpx(args or EMPTY, "args")
  local job = new_job(self, st, "apply", f, APPLY)
  job.abytes, job.afds = abytes, afds
  job.timeout = timeout
  job.callback, job.error_callback = cb, ecb
  job.chunksize = 1
  local res = setmetatable({[JOB] = job}, AsyncResult)
  submit(st, job)
  return res
end

local function apply_get(self, f, args) return self:apply_async(f, args):get() end

local function apply_done(self, ok, ...)
  if not ok then
    local err = ...
    pool_interrupted(state_of(self), err)
    error(err, 0)
  end
  return ...
end

function Pool:apply(f, args)
  return apply_done(self, pcall(apply_get, self, f, args))   -- re-raised
end

function Pool:map_async(f, list, opts)
  return map_job(self, "map_async", f, list, opts, MAP)
end

function Pool:starmap_async(f, list, opts)
  return map_job(self, "starmap_async", f, list, opts, STAR)
end

local function blocking_map(self, what, f, list, opts, mode)
  if opts ~= nil and type(opts) == "table" and (opts.callback or opts.error_callback) then
    raise("Value", what .. ": callbacks belong to " .. what .. "_async")
  end
  local okj, res = pcall(map_job, self, what, f, list, opts, mode)   -- re-raised
  if not okj then
    pool_interrupted(state_of(self), res)
    error(res, 0)
  end
  local ok, v = pcall(res.get, res)   -- re-raised
  local job = res[JOB]
  if not ok then pool_interrupted(state_of(self), v) end
  if job.progress and not job.ready then
    progress_draw(job.progress, job.done_items, true, is_error(v, "Interrupted") and "interrupted" or "failed")
    job.progress = nil
  end
  if not ok then error(v, 0) end
  return v
end

function Pool:map(f, list, opts) return blocking_map(self, "map", f, list, opts, MAP) end
function Pool:starmap(f, list, opts) return blocking_map(self, "starmap", f, list, opts, STAR) end

local imap_known = {chunksize = true, progress = true, timeout = true}

local function imap(self, what, f, list, opts, ordered)
  local st = state_of(self)
  check_running(st)
  check_callable(f, what)
  opts = call_options(what, opts, imap_known)
  local cs = check_chunksize(what, opts.chunksize) or 1
  check_task_timeout(what, opts.timeout, st)
  local job = new_job(self, st, "imap", f, MAP)
  job.chunksize = cs
  job.timeout = opts.timeout
  job.ordered = ordered
  job.buf = {}
  job.uq = dq_new()
  job.yielded = 0
  job.consumed = 0
  job.window = cs * math.max(st.processes * 8, 64)
  if type(list) == "function" then
    job.iter = list
  else
    job.list = list
    job.len = sequence_len(list, what)
    job.total = job.len
  end
  if opts.progress then job.progress = progress_new(job.total) end
  local it = setmetatable({[JOB] = job}, IMap)
  submit(st, job)
  return it, nil, nil, it
end

function Pool:imap(f, list, opts) return imap(self, "imap", f, list, opts, true) end
function Pool:imap_unordered(f, list, opts) return imap(self, "imap_unordered", f, list, opts, false) end

function Pool:close()
  local st = state_of(self)
  if st.state == "RUN" then
    st.state = "CLOSE"
    -- as in Python, what was submitted still runs: imaps now take all their input
    for _, job in pairs(st.jobs) do job.window = nil end
    settle(st)
  end
end

function Pool:terminate()
  terminate(state_of(self))
end

function Pool:join()
  local st = state_of(self)
  if st.state == "RUN" then raise("Value", "join: the pool is still running (close or terminate it first)") end
  wait_until(st, function() return #st.workers == 0 end)
end

-- pids() -> the pids of the pool's workers now, in the order they were started
function Pool:pids()
  local st = state_of(self)
  local out = {}
  for i, w in ipairs(st.workers) do out[i] = w.pid end
  return out
end

Pool_mt.__tostring = function(self)
  local st = S[self]
  return string.format("<Pool processes=%d state=%s>", st.processes, st.state)
end

Pool_mt.__close = function(self) terminate(S[self]) end

Pool_mt.__gc = function(self)
  local st = S[self]
  if st and st.owner == core.getpid() and st.state ~= "TERMINATE" then
    U.pcall(terminate, st)
  end
end

Pool_mt.__index = function(self, k)
  if k == "processes" then return S[self].processes end
  if k == "state" then return S[self].state end
  return Pool[k]
end

local pool_known = {processes = true, initializer = true, initargs = true, maxtasksperchild = true}

local function new_pool(opts)
  opts = U.options("Pool", opts, "processes", pool_known)
  local n = opts.processes
  if n == nil then n = core.cpu_count() end
  if math.type(n) ~= "integer" or n < 1 then raise("Value", "Pool: processes must be a positive integer") end
  if opts.initializer ~= nil then check_callable(opts.initializer, "Pool: initializer") end
  if opts.initargs ~= nil and type(opts.initargs) ~= "table" then raise("Value", "Pool: initargs must be a table") end
  local mt = opts.maxtasksperchild
  if mt ~= nil and (math.type(mt) ~= "integer" or mt < 1) then
    raise("Value", "Pool: maxtasksperchild must be a positive integer")
  end
  if core.is_daemon() then raise("Value", "daemonic processes are not allowed to have children") end
  local st = {
    owner = core.getpid(), processes = n, state = "RUN",
    initializer = opts.initializer, initargs = opts.initargs, maxtasks = mt,
    workers = {}, active = {}, fds = {}, by_fd = {}, fds_dirty = true,
    feed = dq_new(), jobs = {}, njobs = 0, next_job = 0,
    fcache = setmetatable({}, {__mode = "k"}), next_fid = 0,
    callbacks = dq_new(),
    gbase = global_functions(), gmemo = setmetatable({}, {__mode = "k"}),
    -- the message of send_direct, refilled for each task
    apply_msg = {false, false, false, 0, 1, 0, APPLY, 1, false},
    method = creating_method or require("luamp.process").get_start_method(),
    epoch = now(), free_slots = {}, dying = 0,
    -- with more workers than CPUs, a spinning side would only keep a peer that has work
    -- off a CPU: nobody spins then (see ring.c), but while a cpu_job's chunks run on no
    -- more workers than CPUs (SPIN_OK, spin_for_result)
    spin = n <= core.cpu_count(),
    ncpu = core.cpu_count(), oversub = n > core.cpu_count(),
  }
  -- the workers' start stamps (see TIMED): one slot per worker, in blocks of n made as
  -- needed (a replacement starts before the killed worker it replaces is reaped)
  st.pump = function(fd)
    service_fd(st, fd)
    settle(st)
  end
  local self = setmetatable({}, Pool_mt)
  S[self] = st
  live_pools[st] = true
  age_heap(st)
  local ok, err = pcall(function() for _ = 1, n do spawn(st) end end)   -- re-raised
  if not ok then
    terminate(st)
    error(err, 0)
  end
  return self
end

local P = {}

-- A Pool whose workers use start method m (get_context(m).Pool).
function P._pool_with_method(m, ...)
  creating_method = m
  local ok, pool = pcall(P.Pool, ...)
  creating_method = nil
  if not ok then error(pool, 0) end
  return pool
end

-- For specs: how long a busy worker's chunk may run past its estimate before tiny_busy
-- stops counting it (on a loaded machine a descheduled worker looks stalled). Returns
-- the value before.
function P._tiny_stall(seconds)
  local old = STALL_MIN
  STALL_MIN = seconds
  return old
end

-- The entry of a worker started by spawn (runs in the fresh interpreter).
function P._spawn_worker(conn, ring, initializer, initargs, maxtasks, stamps, slot, epoch, spin)
  local st = {workers = {}, initializer = initializer, initargs = initargs, maxtasks = maxtasks,
              spin = spin,
              epoch = epoch}
  return worker_main(st, {close = function() end}, conn, ring, stamps, slot)
end

-- as_completed(results, [timeout]): an iterator yielding each AsyncResult of the list
-- once, as it becomes ready, in finishing order; Timeout when the time (counted from
-- this call) runs out. The results may come from several pools of this process.
function P.as_completed(results, timeout)
  if type(results) ~= "table" then raise("Value", "as_completed: expected a list of AsyncResults") end
  U.check_timeout("as_completed", timeout)
  local pending, seen = {}, {}
  for i = 1, results.n or #results do
    local r = results[i]
    if getmetatable(r) ~= AsyncResult then
      raise("Value", string.format("as_completed: item %d is not an AsyncResult", i))
    end
    if not seen[r] then
      seen[r] = true
      pending[#pending + 1] = r
      check_owner(r[JOB].st)
    end
  end
  local deadline = timeout and now() + math.max(timeout, 0)
  local total = #pending
  return function()
    while true do
      local best
      for i, r in ipairs(pending) do
        local job = r[JOB]
        if job.ready and (not best or job.finished < pending[best][JOB].finished) then best = i end
      end
      if best then return table.remove(pending, best) end
      if #pending == 0 then return nil end
      if deadline and now() >= deadline then
        raise("Timeout", string.format("%d of %d results not ready after %g s",
          #pending, total, timeout))
      end
      local sts, have = {}, {}
      for _, r in ipairs(pending) do
        local st = r[JOB].st
        if not have[st] then have[st] = true; sts[#sts + 1] = st end
      end
      wait_many(sts, deadline)
    end
  end
end

function P.Pool(opts)
  if type(opts) == "table" and opts.broker ~= nil then   -- across machines, over Redis
    return require("luamp.broker").Pool(opts)
  end
  return new_pool(opts)
end

-- What luamp.active_children() lists for pool workers: a small read-only view of each
-- live worker (pid, name, sentinel, is_alive), as Python lists its ForkPoolWorker-N.
local PoolWorker = {}
PoolWorker.__name = "luamp.PoolWorker"
PoolWorker.__index = function(self, k)
  local w = rawget(self, PoolWorker)
  if k == "pid" then return w.pid end
  if k == "name" then return w.name end
  if k == "sentinel" then return not w.dead and w.sfd or nil end
  if k == "is_alive" then return function() return not w.dead end end
  return nil
end
PoolWorker.__tostring = function(self)
  local w = rawget(self, PoolWorker)
  return string.format("<PoolWorker name=%s pid=%d %s>", w.name, w.pid, w.dead and "stopped" or "started")
end

function P._active_workers()
  local out = {}
  local me = core.getpid()
  for st in pairs(live_pools) do
    if st.owner == me then
      for _, w in ipairs(st.workers) do
        if not w.dead then
          w.view = w.view or setmetatable({[PoolWorker] = w}, PoolWorker)
          out[#out + 1] = w.view
        end
      end
    end
  end
  table.sort(out, function(a, b) return a.pid < b.pid end)
  return out
end

-- luamp.poll(): runs what is due in the background (pool results, callbacks) without
-- waiting; returns how many sources had something.
function P.poll()
  local n = core.pump_poll()
  -- the timed tasks are looked at here too (a task that hangs makes no fd ready)
  local me = core.getpid()
  for _, st in pairs(S) do
    if st.owner == me and st.state ~= "TERMINATE" then
      local _, killed = check_timeouts(st)
      if killed then settle(st) end
    end
  end
  return n
end

return P
