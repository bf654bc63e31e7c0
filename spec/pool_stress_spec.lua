-- luamp.Pool under stress: workers killed mid-stream, big messages both ways, pools
-- made and dropped in a loop, callbacks that submit more work, several pools at once.
local H = require "helper"
local luamp = H.luamp
-- task functions take their _ENV along: it must be the real global table
local describe, it, assert = describe, it, assert
local _ENV = _G

local range = H.range

local count_fds = H.fd_count

describe("Pool under stress", function()
  it("workers killed while a stream runs: each item is right or WorkerLost, never lost", function()
    local p <close> = luamp.Pool(2)
    local it = p:imap_unordered(function(x)
      luamp.sleep(0.001)
      return {x * 2, luamp.getpid()}
    end, range(600))
    local seen, lost, kills = {}, 0, 0
    local got = 0
    while true do
      local ok, v, i = pcall(it.next, it, 30)
      if ok and v == nil and i == nil then break end
      if ok then
        assert.equal(i * 2, v[1])
        assert.is_nil(seen[i])
        seen[i] = true
        got = got + 1
        if got % 150 == 0 and kills < 3 then
          kills = kills + 1
          os.execute("kill -9 " .. v[2] .. " 2>/dev/null")
        end
      else
        assert.equal("WorkerLost", v.kind)
        lost = lost + 1
      end
    end
    assert.is_true(lost <= kills)
    assert.equal(600, got + lost)
    assert.same({2, n = 1}, p:map(function(x) return 2 * x end, {1}))
  end)

  it("big arguments and results in both directions at once do not deadlock", function()
    local p <close> = luamp.Pool(2)
    local big = string.rep("x", 1 << 20)
    local items = {}
    for i = 1, 12 do items[i] = big .. i end
    local r = p:map(function(s) return s:upper() end, items, 1)
    for i = 1, 12 do assert.equal(big:upper() .. i, r[i]) end
    -- and many small ones after
    local s = p:map(function(x) return x end, range(5000), 1)
    assert.equal(5000, s.n)
  end)

  it("pools made and terminated in a loop leak no descriptors or processes", function()
    local before = count_fds()
    for _ = 1, 20 do
      local p <close> = luamp.Pool(2)
      p:apply(luamp.getpid)
    end
    assert.equal(before, count_fds())
    assert.equal(0, #luamp.active_children())
  end)

  it("maxtasksperchild=1 over many tasks", function()
    local before = count_fds()
    local p = luamp.Pool{processes = 2, maxtasksperchild = 1}
    local pids = {}
    local r = p:map(function(x) return luamp.getpid() end, range(60), 1)
    for i = 1, 60 do pids[r[i]] = true end
    local n = 0
    for _ in pairs(pids) do n = n + 1 end
    assert.equal(60, n)
    p:close()
    p:join()
    assert.equal(before, count_fds())
  end)

  it("callbacks that submit more work chain through", function()
    local p <close> = luamp.Pool(2)
    local r, w = luamp.Pipe(false)
    local function step(n)
      if n == 50 then w:send(n); return end
      p:apply_async(function(x) return x + 1 end, {n}, {callback = step})
    end
    step(0)
    assert.equal(50, r:recv())
  end)

  it("one pool's callbacks run while the program waits on another pool", function()
    local a <close> = luamp.Pool(1)
    local b <close> = luamp.Pool(1)
    local done = {}
    for i = 1, 20 do
      a:apply_async(function(x) return x end, {i}, {callback = function(x) done[#done + 1] = x end})
    end
    -- only b is waited on; a's results and callbacks come in meanwhile
    for _ = 1, 500 do
      if #done == 20 then break end
      b:apply(luamp.sleep, {0.01})
    end
    assert.equal(20, #done)
  end)

  it("a pool nobody holds is terminated by the collector", function()
    local pid
    do
      local p = luamp.Pool(1)
      pid = p:apply(luamp.getpid)
    end
    collectgarbage()
    collectgarbage()
    assert.is_false(os.execute("kill -0 " .. pid .. " 2>/dev/null") == true)
  end)
end)
