-- cmake --install lays out a working luamp: the binary runs from any directory with no
-- files beside it, the module loads in stock lua5.4, and pkg-config describes the library.
local H = require "helper"

describe("cmake --install", function()
  local dest = os.tmpname()
  os.remove(dest)

  setup(function()
    local _, code = H.sh("DESTDIR=" .. H.q(dest) .. " cmake --install " .. H.q(H.build) .. " >/dev/null 2>&1")
    assert.equal(0, code)
  end)

  teardown(function() H.sh("rm -rf " .. H.q(dest)) end)

  it("installs a host that runs scripts from any directory", function()
    local src = H.script([[local p = luamp.Process{target = function() print("child ok") end} p:start() p:join()]])
    local out, code = H.sh("cd / && " .. H.q(dest .. "/usr/local/bin/luamp") .. " " .. src)
    os.remove(src)
    assert.equal(0, code)
    assert.equal("child ok\n", out)
  end)

  it("installs luamp.so where lua5.4 finds it", function()
    local out = H.sh("cd / && " .. H.stock_lua(dest .. "/usr/local/lib/lua/5.4/?.so") ..
      [[ -e 'print(require("luamp").get_start_method())']])
    assert.equal("fork\n", out)
  end)

  it("installs the header, the libraries and luamp.pc", function()
    for _, f in ipairs{"include/luamp.h", "lib/libluamp.a", "lib/libluamp.so", "lib/pkgconfig/luamp.pc"} do
      assert.truthy(io.open(dest .. "/usr/local/" .. f), f .. " missing")
    end
    local out = H.sh("PKG_CONFIG_PATH=" .. H.q(dest .. "/usr/local/lib/pkgconfig") .. " pkg-config --libs luamp")
    assert.truthy(out:find("-lluamp", 1, true))
  end)
end)
