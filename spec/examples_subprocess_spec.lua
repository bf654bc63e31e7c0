-- Runs the subprocess example ports in scripts/examples/ through the luamp host.
local H = require "helper"

local example = H.example

describe("subprocess examples", function()
  it("subprocess_call: the command's output, then its exit code", function()
    local out = example("subprocess_call.lua")
    assert.truthy(out:match("^%$ getent hosts localhost\n[%x:%.]+%s+localhost[^\n]*\n.-Exit code:\t0\n$"), out)
  end)

  it("subprocess_communicate: the child's answers to its input", function()
    assert.equal("$ sh\n/\nhello from sh\n\nExit code:\t0\n", example("subprocess_communicate.lua"))
  end)
end)
