-- Shared by the specs: the module under test, where the build is, and a way to run the
-- luamp host on a script and see its output and exit status.
local H = {}

H.build = os.getenv("LUAMP_BUILD") or "build"
H.luamp = require "luamp"
H.root = (function()
  local p = io.popen("pwd")
  local d = p:read("l")
  p:close()
  return d
end)()
H.host = H.root .. "/" .. H.build .. "/luamp"

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
H.q = shell_quote

-- The shell prefix that runs stock lua5.4 with the built luamp.so (or `cpath`) on its
-- cpath (with the sanitizer runtime preloaded when the build is sanitized).
function H.stock_lua(cpath)
  local env = "LUA_CPATH=" .. shell_quote(cpath or (H.root .. "/" .. H.build .. "/?.so;;"))
  if os.getenv("LUAMP_SANITIZE") == "1" then
    local p = io.popen("gcc -print-file-name=libasan.so")
    local asan = p:read("l")
    p:close()
    env = env .. " LD_PRELOAD=" .. shell_quote(asan)
  end
  return env .. " lua5.4"
end

-- Descriptors open in this process, counted without starting a process: `ls /proc/PID/fd`
-- through io.popen also lists popen's own pipe end for the child, which this process
-- closes only after the shell has started (posix_spawn returns at exec), so on a loaded
-- machine ls sometimes saw one descriptor more (13 for 12), with no leak at all. Each
-- probe opens /proc/self/fdinfo/N: the probe's own descriptor is not installed while the
-- path is looked up, so it never counts itself, and it is closed before the next.
-- Every open descriptor is below FDSize, the size of the process's descriptor table.
function H.fd_count()
  local st = assert(io.open("/proc/self/status"))
  local size = assert(tonumber(st:read("a"):match("\nFDSize:%s*(%d+)")))
  st:close()
  local n = 0
  for fd = 0, size - 1 do
    local f = io.open("/proc/self/fdinfo/" .. fd)
    if f then
      n = n + 1
      f:close()
    end
  end
  return n
end

-- Runs a shell command; returns stdout, exit code (-N if killed by signal N).
function H.sh(cmd)
  local p = io.popen(cmd, "r")
  local out = p:read("a")
  local ok, how, code = p:close()
  if how == "signal" then code = -code end
  return out, code
end

-- Runs the luamp host with args (a list) and optional stdin text; stderr is captured
-- separately. Returns stdout, stderr, exit code.
function H.run(args, stdin)
  local errf = os.tmpname()
  local inf
  local cmd = shell_quote(H.host)
  for _, a in ipairs(args) do cmd = cmd .. " " .. shell_quote(a) end
  if stdin then
    inf = os.tmpname()
    local f = assert(io.open(inf, "wb")); f:write(stdin); f:close()
    cmd = cmd .. " < " .. inf
  else
    cmd = cmd .. " < /dev/null"
  end
  local out, code = H.sh(cmd .. " 2> " .. errf)
  local f = assert(io.open(errf, "rb")); local err = f:read("a"); f:close()
  os.remove(errf)
  if inf then os.remove(inf) end
  return out, err, code
end

-- Starts a Process running f(...) and returns it.
function H.start(f, ...)
  local p = H.luamp.Process{target = f, args = table.pack(...)}
  p:start()
  return p
end

-- Waits (on the queue's own bookkeeping, not on time) until n processes are blocked in
-- q's `class` ("get" or "put" side).
function H.until_waiting(q, class, n)
  local deadline = H.luamp.time() + 30
  while q:_waiters(class) < n do
    if H.luamp.time() >= deadline then error("no process blocked in " .. class, 2) end
    H.luamp.sleep(0.001)
  end
end

-- Runs scripts/examples/<name> in the host, asserts it exited 0, returns its stdout.
function H.example(name, ...)
  local out, err, code = H.run({"scripts/examples/" .. name, ...})
  if code ~= 0 then error(name .. " exited with " .. tostring(code) .. ":\n" .. err, 2) end
  return out
end

-- The non-empty lines of s, as a list.
function H.lines(s)
  local t = {}
  for l in s:gmatch("[^\n]+") do t[#t + 1] = l end
  return t
end

-- Writes a Lua script to a temp file and returns its path.
function H.script(src)
  -- (written into the file os.tmpname made, then renamed: a ".lua" beside it left the
  -- empty base file behind, tens of thousands of them in /tmp)
  local base = os.tmpname()
  local f = assert(io.open(base, "w")); f:write(src); f:close()
  local path = base .. ".lua"
  assert(os.rename(base, path))
  return path
end

-- Asserts that fn raises a luamp error of `kind`; returns the error object.
function H.raises(kind, fn, ...)
  local ok, err = pcall(fn, ...)
  assert(not ok, "expected a luamp." .. kind .. " error, but the call succeeded")
  assert(type(err) == "table" and err.kind == kind,
    "expected a luamp." .. kind .. " error, got " .. tostring(err))
  return err
end

-- Starts a process that runs f() with a queue stall armed at `point`
-- (_core._queue_stall parks it there and says so through a pipe); returns the process
-- once it sits there, holding whatever that point holds.
function H.stalled(point, f)
  local luamp = H.luamp
  local r, w = luamp.Pipe(false)
  local p = H.start(function()
    luamp._core._queue_stall(point, w:fileno())
    f()
    os.exit(7)                        -- not reached: the stall never returns
  end)
  assert(r:poll(30) == true, "the process never reached " .. point)
  r:close(); w:close()
  return p
end

-- SIGKILLs p and checks that it died of it.
function H.kill9(p)
  p:kill()
  p:join()
  assert(p.exitcode == -9, "expected exit code -9, got " .. tostring(p.exitcode))
end

-- {1, 2, ..., n}
function H.range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

return H
