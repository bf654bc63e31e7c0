-- luamp.Pool under races (issue 9): two pools whose waits and background pumps
-- interleave, and Ctrl-C at random moments. Each scenario runs in a child process with a
-- time limit, so a hang fails the spec instead of hanging the suite.
local H = require "helper"

-- Runs the luamp host on a script (source text) with a time limit; returns its combined
-- output and exit status (124 when the limit passed: it hung).
local function run_limited(src, limit, ...)
  local script = H.script(src)
  local cmd = "timeout " .. limit .. " " .. H.q(H.host) .. " " .. H.q(script)
  for _, a in ipairs({...}) do cmd = cmd .. " " .. H.q(a) end
  local out, code = H.sh(cmd .. " < /dev/null 2>&1")
  os.remove(script)
  return out, code
end

describe("Pool with another pool busy", function()
  -- b's wait reports b's connection ready; before returning, the wait runs a's pumps,
  -- and a receive inside them (waiting on a's connection) runs b's pump, which takes b's
  -- result. b must then find nothing to read without blocking on it.
  local two_pools = [[
    local luamp = require "luamp"
    local rounds, with_cb, b_task = tonumber(arg[1]), arg[2] == "cb", arg[3]
    local function identity(x) return x end
    local function nothing() end
    local a <close> = luamp.Pool(1)
    local b <close> = luamp.Pool(1)
    local got = 0
    for r = 1, rounds do
      for i = 1, 20 do
        if with_cb then a:apply_async(identity, {i}, nothing) else a:apply_async(identity, {i}) end
      end
      if b_task == "sleep" then
        b:apply(luamp.sleep, {0.01})
        got = got + 1
      else
        got = got + (b:apply(identity, {1}))
      end
    end
    print(got)
  ]]

  local function check(rounds, cb, task)
    local out, code = run_limited(two_pools, 60, rounds, cb, task)
    assert.are.equal(0, code, code == 124 and "hung" or out)
    assert.are.equal(rounds .. "\n", out)
  end

  it("never hangs when b's result was taken by a pump during b's own wait", function()
    check(300, "cb", "identity")
  end)

  it("never hangs without callbacks either", function()
    check(300, "", "identity")
  end)

  it("never hangs in the reported form (b sleeps 10 ms per round)", function()
    check(60, "cb", "sleep")
  end)
end)
