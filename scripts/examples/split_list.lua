-- Port of the "split a list across 32 processes" example: 100 items, divided as evenly
-- as rounding allows, one process per slice.
local luamp = require "luamp"

local function process_data(filelist)
  for _, filepath in ipairs(filelist) do
    print(string.format("Processing %d ...", filepath))
  end
end

local full_list = {}
for x = 0, 99 do full_list[#full_list + 1] = x end

local n_total = #full_list
local n_processes = 32
local length = n_total / n_processes

-- indices of the slice boundaries, rounded half away from zero like Python 2's round
local indices = {}
for i = 0, n_processes do indices[i] = math.floor(i * length + 0.5) end

local processes = {}
for i = 0, n_processes - 1 do
  local sublist = table.move(full_list, indices[i] + 1, indices[i + 1], 1, {})
  processes[#processes + 1] = luamp.Process{target = process_data, args = {sublist}}
end

for _, p in ipairs(processes) do p:start() end
for _, p in ipairs(processes) do p:join() end
