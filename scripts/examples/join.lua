-- Port of the join example: the main process blocks in join until the child is done,
-- so "I M THE MAIN PROCESS!" always comes last. (The seed sleeps 10 s; pass a number of
-- seconds as the first argument, default 1.)
local luamp = require "luamp"
local seconds = tonumber(arg and arg[1]) or 1

local function f(name)
  luamp.sleep(seconds)
  print("hello", name, "!")
end

local p = luamp.Process{target = f, args = {"zhuxiaoxu"}}
p:start()
p:join()
print("I M THE MAIN PROCESS!")
