-- Runs the Manager example ports in scripts/examples/: the Manager dict/list and counter
-- examples, and the distributed master/worker pair as separate programs, over 127.0.0.1
-- and (as root) across two network namespaces joined by a veth pair, standing in for two
-- machines.
local H = require "helper"

local example, lines = H.example, H.lines

-- Starts the master in the background (with `prefix` before the command, e.g. an `ip
-- netns exec`); returns the pipe and the port it listens on.
local function start_master(prefix, host, port)
  local cmd = (prefix or "") .. H.q(H.host) .. " scripts/examples/task_master.lua " .. H.q(host)
      .. " " .. port .. " 2>&1"
  local pipe = assert(io.popen(cmd, "r"))
  local first = pipe:read("l")
  local got = first and first:match("^Manager at .*:(%d+)$")
  if not got then
    local rest = pipe:read("a")
    pipe:close()
    error("master did not start: " .. tostring(first) .. "\n" .. tostring(rest), 2)
  end
  return pipe, tonumber(got)
end

local function check_run(master_out, worker_out)
  local tasks, results = {}, {}
  for _, l in ipairs(lines(master_out)) do
    local n = l:match("^Put task (%d+)%.%.%.$")
    if n then tasks[#tasks + 1] = tonumber(n) end
    local a, b, c = l:match("^Result: (%d+) %* (%d+) = (%d+)$")
    if a then
      assert.equal(a, b)
      assert.equal(tonumber(a) * tonumber(a), tonumber(c))
      results[#results + 1] = tonumber(a)
    end
  end
  assert.equal(10, #tasks)
  assert.same(tasks, results)                 -- one worker: results in task order
  assert.truthy(master_out:match("master exit%.\n$"), master_out)
  local w = lines(worker_out)
  assert.truthy(w[1]:match("^Connect to server "))
  assert.equal(10, #(function() local t = {} for _, l in ipairs(w) do if l:match("^run task") then t[#t + 1] = l end end return t end)())
  assert.equal("worker exit.", w[#w])
end

describe("Manager examples", function()
  it("manager_dict_list: the child's changes are seen by the parent", function()
    assert.equal('{1: "2", "2": 2}\n[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]\n', example("manager_dict_list.lua"))
  end)

  it("manager_counter: 100 processes count to exactly 100 through a manager Value", function()
    local l = lines(example("manager_counter.lua"))
    assert.equal("------------------------", l[1])
    assert.truthy(l[2]:match("^process id:\t%d+$"))
    assert.equal("100", l[3])
  end)

  it("manager_schedule_once: printx starts exactly once", function()
    local l = lines(example("manager_schedule_once.lua", "2"))
    local running, ran, hello = 0, 0, 0
    for _, s in ipairs(l) do
      if s == "printx is running..." then running = running + 1
      elseif s == "printx has ran." then ran = ran + 1
      elseif s == "hello x" then hello = hello + 1 end
    end
    assert.same({1, 2, 2}, {running, ran, hello})
  end)

  it("task_master and task_worker as two programs over 127.0.0.1", function()
    local pipe, port = start_master(nil, "127.0.0.1", 0)
    local wout, werr, wcode = H.run({"scripts/examples/task_worker.lua", "127.0.0.1", tostring(port), "0.01"})
    local mout = pipe:read("a")
    local _, _, mcode = pipe:close()
    assert.equal(0, wcode, werr)
    assert.equal(0, mcode)
    check_run("Manager at\n" .. mout, wout)
  end)

  local function can_netns()
    if H.sh("id -u") ~= "0\n" then return false, "not root" end
    if select(2, H.sh("command -v ip >/dev/null 2>&1")) ~= 0 then return false, "no ip command" end
    return true
  end

  local ok_ns, why = can_netns()
  if not ok_ns then
    pending("task_master/task_worker across two network namespaces (skipped: " .. why .. ")")
  else
    it("task_master and task_worker across two network namespaces joined by a veth pair", function()
      local tag = tostring(H.luamp.getpid() % 100000)
      local a, b = "luamp-m" .. tag .. "a", "luamp-m" .. tag .. "b"
      local subnet = "10.200." .. (H.luamp.getpid() % 250 + 1)
      local cleanup = "ip netns del " .. a .. " 2>/dev/null; ip netns del " .. b .. " 2>/dev/null; true"
      H.sh(cleanup)
      finally(function() H.sh(cleanup) end)
      local setup = table.concat({
        "ip netns add " .. a, "ip netns add " .. b,
        "ip link add lmv" .. tag .. "a netns " .. a .. " type veth peer name lmv" .. tag .. "b netns " .. b,
        "ip -n " .. a .. " addr add " .. subnet .. ".1/24 dev lmv" .. tag .. "a",
        "ip -n " .. b .. " addr add " .. subnet .. ".2/24 dev lmv" .. tag .. "b",
        "ip -n " .. a .. " link set lmv" .. tag .. "a up", "ip -n " .. b .. " link set lmv" .. tag .. "b up",
        "ip -n " .. a .. " link set lo up", "ip -n " .. b .. " link set lo up",
      }, " && ")
      local out, code = H.sh("(" .. setup .. ") 2>&1")
      assert.equal(0, code, out)
      -- the master's address exists only inside namespace a
      local pipe, port = start_master("ip netns exec " .. a .. " ", subnet .. ".1", 5000)
      assert.equal(5000, port)
      local wout, wcode = H.sh("ip netns exec " .. b .. " " .. H.q(H.host)
        .. " scripts/examples/task_worker.lua " .. subnet .. ".1 5000 0.01 2>&1")
      local mout = pipe:read("a")
      local _, _, mcode = pipe:close()
      assert.equal(0, wcode, wout)
      assert.equal(0, mcode, mout)
      check_run("Manager at\n" .. mout, wout)
    end)
  end
end)
