-- Run 50 shell commands, 4 at a time, each with a timeout: one luamp.task per command,
-- a Semaphore for the 4 slots. Every wait (the slot, the command's output, its exit,
-- its timeout) suspends only its own task, and one wait serves them all.
local luamp = require "luamp"
local sp = luamp.subprocess

local slots = luamp.Semaphore(4)
local ok, timed_out, running, most = 0, 0, 0, 0

for i = 1, 50 do
  -- every tenth command hangs, and is killed at its timeout (2 s: far more than an echo
  -- needs even on a busy machine, where a shell's start alone can take most of a second)
  local cmd = i % 10 == 0 and "exec sleep 30" or "echo command " .. i
  luamp.task(function()
    slots:acquire()
    running = running + 1
    most = math.max(most, running)
    local done, r = pcall(sp.run, {"sh", "-c", cmd}, {capture_output = true, timeout = 2})
    running = running - 1
    slots:release()
    if done and r.stdout == "command " .. i .. "\n" then
      ok = ok + 1
    elseif not done and r.kind == "Timeout" then
      timed_out = timed_out + 1
    else
      error(r, 0)   -- anything else (Ctrl-C among it) is not ours to swallow
    end
  end)
end

luamp.run()
print(string.format("%d finished, %d timed out, at most %d at once", ok, timed_out, most))
