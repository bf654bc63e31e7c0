local H = require "helper"

-- What a fresh forked child costs: it must not pay the dynamic linker for calls the
-- parent could have resolved once (each lazy binding in a child reads symbol tables and
-- copies a GOT page: about 16 page faults per child before).
describe("Process start", function()
  it("leaves the child no symbol of liblua or luamp to bind lazily", function()
    local log = os.tmpname()
    local path = H.script([[
      local luamp = require "luamp"
      for _ = 1, 3 do
        local p = luamp.Process{target = function() end}
        p:start()
        print(p.pid)
        p:join()
      end
    ]])
    local out, code = H.sh("LD_DEBUG=bindings LD_DEBUG_OUTPUT=" .. H.q(log) .. " " ..
      H.q(H.host) .. " " .. H.q(path) .. " 2>&1")
    os.remove(path)
    assert.are.equal(0, code, out)
    local children = {}
    for pid in out:gmatch("%d+") do children[pid] = true end
    local bound, lines = {}, 0
    -- glibc writes the log to LOG.<pid> of the process that opened it; forked children
    -- inherit the descriptor, so their lines land in the same file, each under its pid
    local p = io.popen("cat " .. H.q(log) .. ".* 2>/dev/null")
    for line in p:lines() do
      local pid, from, sym = line:match("^%s*(%d+):%s+binding file (%S+) .-symbol `([^']+)'")
      if pid then lines = lines + 1 end
      if pid and children[pid] and (from:find("liblua", 1, true) or from:find("/luamp", 1, true)) then
        bound[#bound + 1] = sym
      end
    end
    p:close()
    os.execute("rm -f " .. H.q(log) .. ".* " .. H.q(log))
    assert.is_true(lines > 0, "LD_DEBUG wrote no bindings at all")
    assert.are.same({}, bound)
  end)
end)
