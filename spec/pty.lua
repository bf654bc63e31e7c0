-- Drives the luamp host on a pseudo-terminal (spec/pty_session.py) for the specs of
-- interactive behaviour: Ctrl-C, Ctrl-D, line editing, history.
local H = require "helper"

local P = {}

-- Python string literal for s (the steps file quotes every text that way).
local function pyquote(s)
  return "'" .. s:gsub("[%c'\\\128-\255]", function(c)
    return string.format("\\x%02x", c:byte())
  end) .. "'"
end

P.send = function(s) return "send " .. pyquote(s) end
P.expect = function(rx) return "expect " .. pyquote(rx) end
P.signal = function(name) return "signal " .. name end
P.exit = function(code) return "exit " .. code end
P.raw = "raw"
-- the prompt, once libedit reads keys (before that the terminal is still cooked)
P.prompt = function(text) return P.expect(text or "> ") .. "\n" .. P.raw end

-- Runs the host with args on a terminal through the steps (built with P.send...);
-- env is a table of extra environment variables. Returns passed, transcript.
function P.session(args, steps, env)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(table.concat(steps, "\n"), "\n")
  f:close()
  local cmd = {}
  for k, v in pairs(env or {}) do cmd[#cmd + 1] = k .. "=" .. H.q(v) end
  cmd[#cmd + 1] = "python3 " .. H.q(H.root .. "/spec/pty_session.py") .. " " .. H.q(path) .. " --"
  cmd[#cmd + 1] = H.q(H.host)
  for _, a in ipairs(args) do cmd[#cmd + 1] = H.q(a) end
  local out, code = H.sh(table.concat(cmd, " ") .. " 2>&1")
  os.remove(path)
  return code == 0 and out:match("PASS\n$") ~= nil, out
end

return P
