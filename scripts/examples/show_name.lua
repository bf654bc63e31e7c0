-- Port of "Process name is subprocess": the target builds a string from its argument.
local luamp = require "luamp"

local function show(name)
  print("Process name is " .. name)
end

local proc = luamp.Process{target = show, args = {"subprocess"}}
proc:start()
proc:join()
