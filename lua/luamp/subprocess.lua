-- luamp.subprocess: run, call, check_call, check_output and Popen, shaped like Python's
-- subprocess module. Spawning, pipes, timeouts and waiting live in runtime/subprocess.c
-- (a "luamp.Subprocess" handle on libuv); this file checks and normalises options,
-- builds argv and the environment, and gives Popen, its streams and the results of run
-- their Python-like surface and error objects.
local core = require "luamp._core"
local U = require "luamp.util"

local raise = U.raise
local SIGTERM, SIGKILL = core.signals.SIGTERM, core.signals.SIGKILL

local SP = {PIPE = "pipe", DEVNULL = "devnull", STDOUT = "stdout", INHERIT = "inherit",
            signals = core.signals}

-- ---- options and arguments -------------------------------------------------------------

local popen_known = {stdin = true, stdout = true, stderr = true, cwd = true, env = true,
  env_extra = true, shell = true, executable = true, start_new_session = true}

local function with(base, extra)
  local t = {}
  for k in pairs(base) do t[k] = true end
  for _, k in ipairs(extra) do t[k] = true end
  return t
end
local run_known = with(popen_known, {"capture_output", "input", "timeout", "check"})
local call_known = with(popen_known, {"timeout"})
local output_known = with(popen_known, {"input", "timeout"})

local settings = {pipe = true, inherit = true, devnull = true}

local function check_stdio(name, v)
  if v == nil or settings[v] or (v == "stdout" and name == "stderr") then return v end
  if math.type(v) == "integer" and v >= 0 then return v end
  local t = io.type(v)
  if t == "file" then return v end
  if t == "closed file" then raise("Value", name .. ": the file is closed") end
  raise("Value", string.format(
    '%s must be "pipe", "inherit", "devnull"%s, an open Lua file or an fd, not %s',
    name, name == "stderr" and ', "stdout"' or "", type(v) == "string" and ("'" .. v .. "'") or type(v)))
end

local function arg_string(v, where)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return tostring(v) end
  raise("Value", where .. " must be a string, not " .. t)
end

-- argv for the options: a list (or with shell, a command string run by /bin/sh -c).
local function build_argv(args, opts)
  local argv = {}
  if opts.shell then
    local sh = opts.executable or "/bin/sh"
    argv[1], argv[2] = sh, "-c"
    if type(args) == "table" then
      if args[1] == nil then raise("Value", "args must not be empty") end
      for i = 1, #args do argv[i + 2] = arg_string(args[i], "args[" .. i .. "]") end
    else
      argv[3] = arg_string(args, "a shell command")
    end
    return sh, argv
  end
  if type(args) == "table" then
    if args[1] == nil then raise("Value", "args must not be empty") end
    for i = 1, #args do argv[i] = arg_string(args[i], "args[" .. i .. "]") end
  else
    argv[1] = arg_string(args, "args")
  end
  if argv[1] == "" then raise("Value", "the program name must not be empty") end
  return opts.executable and arg_string(opts.executable, "executable") or argv[1], argv
end

local function env_name(k)
  if type(k) ~= "string" or k == "" or k:find("=", 1, true) then
    raise("Value", "environment names must be non-empty strings without '=': " .. tostring(k))
  end
  return k
end

-- "K=V" strings for the child's environment, or nil to inherit this process's.
local function build_env(opts)
  if opts.env == nil and opts.env_extra == nil then return nil end
  local vars
  if opts.env ~= nil then
    if type(opts.env) ~= "table" then raise("Value", "env must be a table of NAME = value") end
    vars = {}
    for k, v in pairs(opts.env) do vars[env_name(k)] = arg_string(v, "env." .. tostring(k)) end
  else
    vars = core.environ()
  end
  if opts.env_extra ~= nil then
    if type(opts.env_extra) ~= "table" then raise("Value", "env_extra must be a table of NAME = value") end
    for k, v in pairs(opts.env_extra) do vars[env_name(k)] = arg_string(v, "env_extra." .. tostring(k)) end
  end
  local list = {}
  for k, v in pairs(vars) do list[#list + 1] = k .. "=" .. v end
  table.sort(list)
  return list
end

-- A string as a one-line Lua literal ("%q" would break lines at newlines).
local function quote(s)
  return (string.format("%q", s):gsub("\\\n", "\\n"))
end

-- How args read in messages: the command line, with words quoted where needed.
local function describe(args)
  if type(args) ~= "table" then return tostring(args) end
  local words = {}
  for i = 1, #args do
    local w = tostring(args[i])
    words[i] = w:find("^[%w%.%-_/=:,+@%%]+$") and w or quote(w)
  end
  return table.concat(words, " ")
end

-- ---- streams ----------------------------------------------------------------------------

local Stream = {}
local Stream_mt = {__name = "luamp.PopenStream"}
local stream_names = {[0] = "stdin", "stdout", "stderr"}

local function new_stream(h, i)
  return setmetatable({h = h, i = i}, Stream_mt)
end

function Stream:write(...)
  for k = 1, select("#", ...) do
    local v = select(k, ...)
    if type(v) ~= "string" and type(v) ~= "number" then
      raise("Value", "write: argument #" .. k .. " must be a string or number, not " .. type(v))
    end
    self.h:write(self.i, v)
  end
  return self
end

function Stream:flush()
  self.h:flush(self.i)
  return self
end

-- Formats as for Lua files: "a", "l" (the default), "L" or a byte count; "*" prefixes are
-- accepted. Like file:read, stops at the first format that finds no data and returns nil
-- in its place.
function Stream:read(...)
  local n = select("#", ...)
  if n == 0 then return self.h:read(self.i, "l") end
  local out = {}
  for k = 1, n do
    local fmt = select(k, ...)
    if type(fmt) ~= "string" and math.type(fmt) ~= "integer" then
      raise("Value", "read: bad format (" .. tostring(fmt) .. ")")
    end
    local v = self.h:read(self.i, fmt)
    out[k] = v
    if v == nil then return table.unpack(out, 1, k) end
  end
  return table.unpack(out, 1, n)
end

function Stream:lines(...)
  local fmts = table.pack(...)
  return function() return self:read(table.unpack(fmts, 1, fmts.n)) end
end

function Stream:close()
  self.h:close_stream(self.i)
end

Stream_mt.__index = function(self, k)
  if k == "closed" then
    local ok, state = U.pcall(self.h.stream_state, self.h, self.i)
    return not ok or state ~= "open"
  end
  return Stream[k]
end

Stream_mt.__tostring = function(self)
  local ok, state = U.pcall(self.h.stream_state, self.h, self.i)
  return string.format("<PopenStream %s %s>", stream_names[self.i], ok and state or "closed")
end

-- ---- Popen --------------------------------------------------------------------------------

local S = setmetatable({}, {__mode = "k"})   -- private state of each Popen
local sentinel_of, close_sentinel
local Popen = {}
local Popen_mt = {__name = "luamp.Popen"}

local function timeout_error(s, timeout)
  raise("Timeout", string.format("command '%s' timed out after %s seconds",
    describe(s.args), tostring(timeout)), {args = s.args, cmd = s.args, timeout = timeout})
end

local function live(self)
  local s = S[self]
  if s.released then raise("Value", "Popen object is closed") end
  return s
end

local function note(s, code)
  if code ~= nil then s.returncode = code end
  return code
end

function Popen:poll()
  local s = S[self]
  if s.returncode ~= nil or s.released then return s.returncode end
  return note(s, s.h:poll())
end

function Popen:wait(timeout)
  U.check_timeout("wait", timeout)
  local s = S[self]
  if s.returncode ~= nil or s.released then return s.returncode end
  local code = note(s, s.h:wait(timeout))
  if code == nil then timeout_error(s, timeout) end
  return code
end

-- -> stdout, stderr (nil for a stream that is not a pipe). On Timeout nothing is lost:
-- calling communicate again resumes and returns everything.
function Popen:communicate(input, timeout)
  U.check_timeout("communicate", timeout)
  if input ~= nil and type(input) ~= "string" then
    raise("Value", "communicate: input must be a string, not " .. type(input))
  end
  local s = live(self)
  local ok, out, err = s.h:communicate(input, timeout)
  if not ok then timeout_error(s, timeout) end
  note(s, s.h:returncode())
  return out, err
end

function Popen:send_signal(sig)
  if type(sig) == "string" then sig = core.signals[sig] or core.signals["SIG" .. sig] or sig end
  if math.type(sig) ~= "integer" then raise("Value", "send_signal: unknown signal " .. tostring(sig)) end
  local s = S[self]
  if s.released or s.returncode ~= nil then return end
  s.h:signal(sig)
end

function Popen:terminate() self:send_signal(SIGTERM) end
function Popen:kill() self:send_signal(SIGKILL) end

-- The sentinel: an fd of our own, readable once the child ended, made when first asked
-- for and closed with the Popen (release, garbage), so a Popen nobody waits on through
-- luamp.wait costs no descriptor. Until the child is reaped (only a Popen call reaps it)
-- its pid is ours and a pidfd names it; after, a pipe at end of file stands in (always
-- readable), since the pid may belong to someone else by then.
sentinel_of = function(s)
  if s.sentinel or s.released then return s.sentinel end
  if s.returncode == nil and s.h:returncode() == nil then
    s.sentinel = core.pidfd_open(s.pid)
  end
  if not s.sentinel then
    local r, w = require("luamp.connection").Pipe(false)
    w:close()
    s.sentinel_conn, s.sentinel = r, r:fileno()
  end
  return s.sentinel
end

close_sentinel = function(s)
  if s.sentinel_conn then s.sentinel_conn:close()
  elseif s.sentinel then core.close_fd(s.sentinel) end
  s.sentinel, s.sentinel_conn = nil, nil
end

local function release(s)
  if s.released then return end
  close_sentinel(s)
  if s.returncode == nil then note(s, s.h:returncode()) end
  s.released = true
  s.h:close()
end

local function close_quietly(stream)
  if stream then U.pcall(stream.close, stream) end
end

-- `<close>`: closes the streams and waits for the child, as Python's `with` does. When the
-- scope is left by Ctrl-C, the child (and its group, if it has one) is killed first.
Popen_mt.__close = function(self, err)
  local s = S[self]
  if s.released then return end
  if not s.h:owned() then return release(s) end
  if type(err) == "table" and err.kind == "Interrupted" then s.h:signal(SIGKILL, true) end
  close_quietly(s.stdout)
  close_quietly(s.stderr)
  close_quietly(s.stdin)
  self:wait()
  release(s)
end

local getters = {
  pid = function(s) return s.pid end,
  returncode = function(s)
    if s.returncode == nil and not s.released then note(s, s.h:returncode()) end
    return s.returncode
  end,
  args = function(s) return s.args end,
  sentinel = function(s) return sentinel_of(s) end,
  stdin = function(s) return s.stdin end,
  stdout = function(s) return s.stdout end,
  stderr = function(s) return s.stderr end,
}

Popen_mt.__index = function(self, k)
  local g = getters[k]
  if g then return g(S[self]) end
  return Popen[k]
end

Popen_mt.__gc = function(self)
  local s = S[self]
  if s then close_sentinel(s) end
end

Popen_mt.__newindex = function(_, k)
  raise("Value", "cannot set Popen field " .. tostring(k))
end

Popen_mt.__tostring = function(self)
  local s = S[self]
  local code = getters.returncode(s)
  return string.format("<Popen pid=%d args=%s %s>", s.pid, quote(describe(s.args)),
    code == nil and "running" or ("returncode=" .. code))
end

function SP.Popen(args, opts)
  opts = U.options("Popen", opts, nil, popen_known)
  local file, argv = build_argv(args, opts)
  if opts.cwd ~= nil and type(opts.cwd) ~= "string" then raise("Value", "cwd must be a string") end
  local stdio = {check_stdio("stdin", opts.stdin), check_stdio("stdout", opts.stdout),
                 check_stdio("stderr", opts.stderr)}
  local h = core.subprocess_spawn{file = file, argv = argv, env = build_env(opts), cwd = opts.cwd,
    stdio = stdio, group = opts.shell or opts.start_new_session or false}
  local self = setmetatable({}, Popen_mt)
  local s = {h = h, args = args, pid = h:pid()}
  for i, name in ipairs({"stdin", "stdout", "stderr"}) do
    if stdio[i] == "pipe" then s[name] = new_stream(h, i - 1) end
  end
  S[self] = s
  return self
end

-- ---- run and friends ------------------------------------------------------------------------

local Completed = {}
local Completed_mt = {__index = Completed, __name = "luamp.CompletedProcess"}

local function show_output(v)
  if v == nil then return "nil" end
  if #v > 60 then return string.format("%s..(%d bytes)", quote(v:sub(1, 60)), #v) end
  return quote(v)
end

Completed_mt.__tostring = function(r)
  return string.format("CompletedProcess(args=%s, returncode=%d, stdout=%s, stderr=%s)",
    quote(describe(r.args)), r.returncode, show_output(r.stdout), show_output(r.stderr))
end

local function called_process_error(args, returncode, stdout, stderr)
  local how = returncode < 0 and ("died with signal " .. -returncode)
    or ("returned non-zero exit status " .. returncode)
  raise("CalledProcess", string.format("command '%s' %s", describe(args), how),
    {returncode = returncode, cmd = args, args = args, stdout = stdout, output = stdout,
     stderr = stderr})
end

-- Raises CalledProcess when the returncode is not zero.
function Completed:check_returncode()
  if self.returncode ~= 0 then
    called_process_error(self.args, self.returncode, self.stdout, self.stderr)
  end
end

local function popen_options(opts)
  local p = {}
  for k in pairs(popen_known) do p[k] = opts[k] end
  return p
end

function SP.run(args, opts)
  opts = U.options("run", opts, nil, run_known)
  U.check_timeout("run", opts.timeout)
  local popts = popen_options(opts)
  if opts.capture_output then
    if opts.stdout ~= nil or opts.stderr ~= nil then
      raise("Value", "run: capture_output cannot be combined with stdout or stderr")
    end
    popts.stdout, popts.stderr = "pipe", "pipe"
  end
  if opts.input ~= nil then
    if type(opts.input) ~= "string" then raise("Value", "run: input must be a string") end
    if opts.stdin ~= nil then raise("Value", "run: stdin and input cannot both be given") end
    popts.stdin = "pipe"
  end
  local p = SP.Popen(args, popts)
  local s = S[p]
  local ok, out, err = pcall(p.communicate, p, opts.input, opts.timeout)   -- re-raised below
  if not ok then
    -- Timeout or Ctrl-C: the child goes (with everything it started, when it has its own
    -- process group), is reaped, and its pipes are closed even if a grandchild still
    -- holds them open.
    local e = out
    s.h:signal(SIGKILL, true)
    -- a Ctrl-C while reaping it wins over a Timeout, once the cleanup is done
    local okw, werr = pcall(p.wait, p)
    if not okw and U.interrupted(werr) then e = werr end
    if type(e) == "table" and e.kind == "Timeout" then
      e.stdout, e.stderr = s.h:take(1), s.h:take(2)
      e.output = e.stdout
    end
    release(s)
    error(e, 0)
  end
  release(s)
  local r = setmetatable({args = args, returncode = s.returncode, stdout = out, stderr = err},
    Completed_mt)
  if opts.check then r:check_returncode() end
  return r
end

function SP.call(args, opts)
  opts = U.options("call", opts, nil, call_known)
  return SP.run(args, opts).returncode
end

function SP.check_call(args, opts)
  opts = U.options("check_call", opts, nil, call_known)
  local code = SP.run(args, opts).returncode
  if code ~= 0 then called_process_error(args, code) end
  return 0
end

function SP.check_output(args, opts)
  opts = U.options("check_output", opts, nil, output_known)
  if opts.stdout ~= nil then raise("Value", "check_output: stdout is not allowed, it is captured") end
  local ropts = {}
  for k, v in pairs(opts) do ropts[k] = v end
  ropts.stdout, ropts.check = "pipe", true
  return SP.run(args, ropts).stdout
end

return {subprocess = SP}
