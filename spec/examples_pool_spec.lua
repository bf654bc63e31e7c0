-- Runs the Pool example ports in scripts/examples/ through the luamp host, with short
-- sleeps passed as the first argument.
local H = require "helper"

local example = H.example

local lines = H.lines

describe("Pool examples", function()
  it("pool_map_sleep: squares after the sleep", function()
    assert.equal("1, 4, 9\n", example("pool_map_sleep.lua", "0.01"))
  end)

  it("pool_basics: map, imap_unordered, apply_async, getpid, a timeout", function()
    local l = lines(example("pool_basics.lua", "3"))
    assert.equal("0, 1, 4, 9, 16, 25, 36, 49, 64, 81", l[1])
    local squares = {}
    for i = 2, 11 do squares[#squares + 1] = tonumber(l[i]) end
    table.sort(squares)
    assert.same({0, 1, 4, 9, 16, 25, 36, 49, 64, 81}, squares)
    assert.equal("400", l[12])
    assert.truthy(l[13]:match("^%d+$"))
    assert.truthy(l[14]:match("^%d+, %d+, %d+, %d+$"))
    assert.equal("We lacked patience and got a luamp.Timeout", l[15])
  end)

  it("pool_long_tasks: task 4 starts only after one of tasks 0-3 ended", function()
    local out = example("pool_long_tasks.lua", "0.2")
    local l = lines(out)
    assert.truthy(l[1]:match("^Parent process %d+%.$"))
    local start4 = out:find("Run task 4 ", 1, true)
    local first_end = out:find("Task %d runs")
    assert.truthy(start4 and first_end and first_end < start4, out)
    for i = 0, 4 do assert.truthy(out:find("Task " .. i .. " runs", 1, true), out) end
    assert.equal("All subprocesses done.", l[#l])
  end)

  it("pool_cpu_count: ten tasks, all done before the last line", function()
    local out = example("pool_cpu_count.lua", "0.05")
    local l = lines(out)
    assert.truthy(l[2]:match("^PC has %d+ CPU workers$"))
    for i = 0, 9 do assert.truthy(out:find("Task " .. i .. " run", 1, true), out) end
    assert.equal("All task done.", l[#l])
  end)

  it("pool_map_async_callback: the callback gets all ten results before join returns", function()
    local out = example("pool_map_async_callback.lua", "0.05")
    local l = lines(out)
    assert.truthy(l[#l - 1]:match("^all process done\t10\t[%d. ]+$"), out)
    assert.equal("All task done.", l[#l])
  end)

  it("pool_multi: results given back", function()
    local l = lines(example("pool_multi.lua", "3"))
    assert.equal("42, 43, 44, 45, 46, 47, 48, 49, 50, 51", l[1])
    assert.equal(l[1], l[2])
    local u = {}
    for v in l[3]:gmatch("%d+") do u[#u + 1] = tonumber(v) end
    table.sort(u)
    assert.same({42, 43, 44, 45, 46, 47, 48, 49, 50, 51}, u)
    assert.equal("62", l[4])
    assert.truthy(l[5]:match("^%d+$"))
    assert.equal("we lacked patience and got a timeout error", l[7])
  end)

  it("pool_sample3: apply_async, map, imap step by step, Timeout", function()
    local l = lines(example("pool_sample3.lua", "3"))
    assert.same({"100", "0, 1, 4, 9, 16, 25, 36, 49, 64, 81", "0", "1", "4"},
      {l[1], l[2], l[3], l[4], l[5]})
    assert.truthy(l[6]:match("^false\tluamp%.Timeout: "), l[6])
  end)

  it("pool_threadpool: the three ThreadPool seeds on a process Pool", function()
    local out = example("pool_threadpool.lua", "0.05")
    local _, sleeps = out:gsub("sleep for %(", "")
    assert.equal(50, sleeps)
    local _, requests = out:gsub("request %d done in", "")
    assert.equal(10, requests)
    assert.truthy(out:find("all delays done", 1, true))
    local l = lines(out)
    assert.equal("All task done.", l[#l])
  end)
end)
