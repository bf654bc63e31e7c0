-- Runs the task (luamp.task / luamp.run) examples in scripts/examples/ through the luamp host.
local H = require "helper"

local example = H.example

describe("task examples", function()
  it("tasks_commands: 50 commands, 4 at a time, the hanging ones cut at their timeout", function()
    -- "at most 4 at once" is counted by the tasks: 4 means the commands did overlap
    assert.equal("45 finished, 5 timed out, at most 4 at once\n", example("tasks_commands.lua"))
  end)

  it("tasks_fan_in: results of two pools and a queue, gathered by three tasks", function()
    assert.equal("squares\t1 4 9 16 25\ncubes\t1 8 27 64 125\nqueue\tevent 1 event 2 event 3\n",
      example("tasks_fan_in.lua"))
  end)
end)
