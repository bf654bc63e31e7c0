-- Runs the Process example ports in scripts/examples/ through the luamp host.
local H = require "helper"

local example = H.example

local lines = H.lines

describe("Process examples", function()
  it("hello", function()
    assert.equal("hello\tbob\n", example("hello.lua"))
  end)

  it("show_name", function()
    assert.equal("Process name is subprocess\n", example("show_name.lua"))
  end)

  it("join prints the main line after the child", function()
    assert.equal("hello\tzhuxiaoxu\t!\nI M THE MAIN PROCESS!\n", example("join.lua", "0.05"))
  end)

  it("fork_pids: parent and child agree on the child's pid", function()
    local out = example("fork_pids.lua")
    local parent = out:match("^Process %((%d+)%) start")
    local child = out:match("just created a child process %((%d+)%)")
    assert.truthy(out:find("I am child process (" .. child .. ") and my parent is " .. parent .. ".", 1, true))
  end)

  it("run_proc", function()
    local l = lines(example("run_proc.lua"))
    assert.truthy(l[1]:match("^Parent process %d+%.$"))
    assert.equal("Child process will start.", l[2])
    assert.truthy(l[3]:match("^Run child process test %(%d+%)%.%.%.$"))
    assert.equal("Child process end.", l[4])
  end)

  it("sleeper_daemon: toggles daemon and joins before exiting", function()
    local out = example("sleeper_daemon.lua", "0.05")
    assert.truthy(out:find("daemon?\tfalse\ndaemon?\ttrue\n", 1, true))
    local done = out:find("bob done sleeping", 1, true)
    local after = out:find("in parent process after child process join", 1, true)
    assert.truthy(done and after and done < after)
  end)

  it("split_list: each of the 100 items is processed exactly once", function()
    local seen = {}
    for _, l in ipairs(lines(example("split_list.lua"))) do
      local n = tonumber(l:match("^Processing (%d+) %.%.%.$"))
      assert.truthy(n, l)
      assert.is_nil(seen[n], "item processed twice: " .. n)
      seen[n] = true
    end
    for i = 0, 99 do assert.truthy(seen[i], "missing item " .. i) end
  end)

  it("no_shared_vars: the parent's table is unchanged", function()
    assert.equal("in global\t{1}\n{}\nin local\t{2}\n{}\n", example("no_shared_vars.lua"))
  end)

  it("my_process: ten run-style tasks, all done before the last line", function()
    local l = lines(example("my_process.lua", "0.05"))
    local running, ran = 0, 0
    for _, s in ipairs(l) do
      if s:match("^Running task %d %(%d+%)$") then running = running + 1 end
      if s:match("^Task %d run %d+%.%d%d seconds%.$") then ran = ran + 1 end
    end
    assert.equal(10, running)
    assert.equal(10, ran)
    assert.equal("All task done.", l[#l])
  end)
end)
