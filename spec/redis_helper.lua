-- A private redis-server for the broker specs: started on 127.0.0.1 on a free port, with
-- no persistence, in a temporary directory; stopped (and the directory removed) by stop.
-- Nothing needs to be running beforehand.
local luamp = require "luamp"
local sp = luamp.subprocess

local R = {}

local function have_redis()
  return os.execute("command -v redis-server >/dev/null 2>&1") == true
end
R.available = have_redis()

-- Answers PING within the deadline? Retries the connect until then (the server is
-- starting); a server that exited stops the wait at once.
local function wait_ready(proc, port, password, deadline)
  while luamp.time() < deadline do
    if proc:poll() ~= nil then return false end
    local ok, c = pcall(luamp._core.redis_connect, "127.0.0.1", port, 1)
    if ok then
      local cmds = password and {{"AUTH", password}, {"PING"}} or {{"PING"}}
      local ok2, r = pcall(c.pipeline, c, cmds, 2)
      c:close()
      if ok2 and r[#r] == "PONG" then return true end
    end
    luamp.sleep(0.02)
  end
  return false
end

-- R.start([{password = s}]) -> server {port, url, proc, dir, stop = function}
function R.start(opts)
  opts = opts or {}
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. dir))
  for _ = 1, 10 do
    local port = math.random(20000, 60000)
    local args = {"redis-server", "--port", tostring(port), "--bind", "127.0.0.1",
      "--save", "", "--appendonly", "no", "--dir", dir, "--logfile", dir .. "/redis.log"}
    if opts.password then args[#args + 1] = "--requirepass"; args[#args + 1] = opts.password end
    local proc = sp.Popen(args, {stdout = "devnull", stderr = "devnull"})
    if wait_ready(proc, port, opts.password, luamp.time() + 10) then
      local s = {port = port, proc = proc, dir = dir}
      s.url = "redis://" .. (opts.password and (":" .. opts.password .. "@") or "") .. "127.0.0.1:" .. port .. "/0"
      function s.stop()
        if s.proc.returncode == nil then
          s.proc:kill()
          s.proc:wait()
        end
      end
      function s.restart()
        s.stop()
        s.proc = sp.Popen(args, {stdout = "devnull", stderr = "devnull"})
        assert(wait_ready(s.proc, port, opts.password, luamp.time() + 10), "redis-server did not restart")
      end
      function s.cleanup()
        s.stop()
        os.execute("rm -rf " .. dir)
      end
      return s
    end
    if proc.returncode == nil then proc:kill(); proc:wait() end
  end
  os.execute("rm -rf " .. dir)
  error("could not start redis-server")
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end
R.read_file = read_file

-- Starts `luamp worker` (the host at `host`) in its own process group; returns
-- {proc, log (path), text(), stop(), signal_group(sig)}.
function R.start_worker(host, url, queue, authkey, nproc, extra)
  local log = os.tmpname()
  local args = {host, "worker", "--broker", url, "--queue", queue, "--authkey", authkey,
    "--processes", tostring(nproc or 1)}
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  local w = {log = log}
  w.proc = sp.Popen(args, {stderr = io.open(log, "w"), stdout = "devnull", start_new_session = true})
  function w.stop()
    if w.proc.returncode == nil then
      w.proc:terminate()
      local ok, code = pcall(w.proc.wait, w.proc, 30)
      if not ok then w.signal_group("KILL"); code = w.proc:wait() end
      w.code = code
    end
    return w.code
  end
  function w.signal_group(sig)
    os.execute(string.format("kill -%s -%d 2>/dev/null", sig, w.proc.pid))
  end
  function w.text() return read_file(log) end
  -- waits (bounded) until the log matches pattern (count times)
  function w.until_logged(pattern, limit, count)
    local deadline = luamp.time() + (limit or 20)
    while true do
      local n = 0
      for _ in w.text():gmatch(pattern) do n = n + 1 end
      if n >= (count or 1) then return end
      if luamp.time() > deadline then error("worker never logged " .. pattern .. "; log:\n" .. w.text(), 2) end
      luamp.sleep(0.02)
    end
  end
  return w
end

return R
