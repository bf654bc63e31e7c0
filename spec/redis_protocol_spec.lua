-- The Redis connection (runtime/redis.c) against a fake server that answers whatever a
-- test scripts: the server is untrusted, so hostile replies end in a clear error, never
-- in a huge allocation, a crash or a hang.
local H = require "helper"
local luamp = H.luamp
local sp = luamp.subprocess

-- A one-connection server: reads one command, writes `reply` (bytes), then closes (or,
-- with `wait`, waits for the client to close). Returns the Popen and its port.
local function fake_server(reply, wait)
  local code = [[
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.recv(65536)
c.sendall(bytes.fromhex(sys.argv[1]))
if sys.argv[2] == "wait":
    try:
        c.recv(65536)
    except Exception:
        pass
c.close()
]]
  local hex = reply:gsub(".", function(ch) return string.format("%02x", ch:byte()) end)
  local py = io.open("/usr/bin/python3") and "/usr/bin/python3" or "python3"
  local p = sp.Popen({py, "-c", code, hex, wait and "wait" or "close"}, {stdout = "pipe"})
  local port = tonumber(p.stdout:read("l"))
  return p, port
end

local function exchange(reply, timeout, wait)
  local p, port = fake_server(reply, wait)
  local c = luamp._core.redis_connect("127.0.0.1", port, 5)
  local ok, r = pcall(c.pipeline, c, {{"PING"}}, timeout or 5)
  c:close()
  p:wait(10)
  return ok, r
end

describe("redis connection against a hostile server", function()
  it("reads ordinary replies of every type", function()
    local ok, r = exchange("*5\r\n$3\r\nabc\r\n:42\r\n$-1\r\n+OK\r\n-ERR no\r\n")
    assert.is_true(ok, tostring(r))
    assert.same({"abc", 42, false, "OK", {redis_error = "ERR no"}}, r[1])
  end)

  it("refuses an array header claiming billions of elements, allocating nothing", function()
    local ok, e = exchange("*2000000000\r\n")
    assert.is_false(ok)
    assert.equal("BrokenPipe", e.kind)
    -- just past the limit, the server staying connected: refused at once (accepted, it
    -- would be allocated and then wait for elements that never come: Timeout)
    ok, e = exchange("*1048577\r\n", 3, true)
    assert.equal("BrokenPipe", e.kind)
  end)

  it("a bulk string whose bytes never come ends with the connection, not a 1 GB buffer", function()
    local ok, e = exchange("$1000000000\r\nabc")
    assert.is_false(ok)
    assert.equal("BrokenPipe", e.kind)
    assert.matches("connection lost", e.message)
  end)

  it("garbage is a protocol error", function()
    local ok, e = exchange("hello world\r\n")
    assert.is_false(ok)
    assert.equal("BrokenPipe", e.kind)
  end)

  it("nesting past hiredis's depth is a protocol error", function()
    local ok, e = exchange(string.rep("*1\r\n", 12) .. ":1\r\n")
    assert.is_false(ok)
    assert.equal("BrokenPipe", e.kind)
  end)

  it("a server that never answers gives Timeout, and the connection is closed", function()
    local p, port = fake_server("", true)
    local c = luamp._core.redis_connect("127.0.0.1", port, 5)
    local t0 = luamp.time()
    local ok, e = pcall(c.pipeline, c, {{"PING"}}, 0.3)
    assert.is_false(ok)
    assert.equal("Timeout", e.kind)
    assert.is_true(luamp.time() - t0 < 3)
    assert.is_true(c:closed())
    c:close()
    p:wait(10)
  end)

  it("checks commands before sending any", function()
    local p, port = fake_server("+PONG\r\n", true)
    local c = luamp._core.redis_connect("127.0.0.1", port, 5)
    local ok, e = pcall(c.pipeline, c, {{"PING"}, {"SET", {}}}, 5)
    assert.is_false(ok)
    assert.equal("Value", e.kind)
    assert.same({"PONG"}, c:pipeline({{"PING"}}, 5))   -- nothing half-sent before
    c:close()
    p:wait(10)
  end)
end)
