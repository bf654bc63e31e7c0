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

-- The first ```c block of the guide's embedding section, with the ```output block after it.
local function guide_c_example()
  local f = assert(io.open(H.root .. "/docs/guide.md", "rb"))
  local text = f:read("a")
  f:close()
  local code, out = text:match("\n```c run\n(.-\n)```%s*\n```output\n(.-\n)```")
  assert(code, "docs/guide.md has no ```c run block followed by an ```output block")
  return code, out
end

describe("cmake --install --prefix", function()
  local prefix = os.tmpname()
  os.remove(prefix)
  local pc_env = "PKG_CONFIG_PATH=" .. H.q(prefix .. "/lib/pkgconfig") .. " "

  setup(function()
    local _, code = H.sh("cmake --install " .. H.q(H.build) .. " --prefix " .. H.q(prefix) .. " >/dev/null 2>&1")
    assert.equal(0, code)
  end)

  teardown(function() H.sh("rm -rf " .. H.q(prefix)) end)

  it("writes a luamp.pc for that prefix, with libedit and libuv private", function()
    local f = assert(io.open(prefix .. "/lib/pkgconfig/luamp.pc"))
    local pc = f:read("a")
    f:close()
    assert.equal(prefix, pc:match("^prefix=([^\n]*)"))
    local requires = pc:match("\nRequires:([^\n]*)")
    assert.falsy(requires:find("libedit", 1, true))
    assert.truthy(pc:match("\nRequires.private:([^\n]*)"):find("libedit", 1, true))
    local out, code = H.sh(pc_env .. "pkg-config --variable=prefix luamp")
    assert.equal(0, code)
    assert.equal(prefix .. "\n", out)
    out = H.sh(pc_env .. "pkg-config --libs luamp")
    assert.truthy(out:find("-L" .. prefix .. "/lib -lluamp", 1, true), out)
    assert.falsy(out:find("-ledit", 1, true), out)
  end)

  it("lets the guide's embedding program build with pkg-config alone, and run", function()
    local code, expected = guide_c_example()
    local dir = os.tmpname()
    os.remove(dir)
    finally(function() H.sh("rm -rf " .. H.q(dir)) end)
    H.sh("mkdir -p " .. H.q(dir))
    local f = assert(io.open(dir .. "/embed.c", "wb"))
    f:write(code)
    f:close()
    local san = os.getenv("LUAMP_SANITIZE") == "1" and " -fsanitize=address,undefined" or ""
    local log, rc = H.sh("cd " .. H.q(dir) .. " && " .. pc_env .. "cc -Wall -Werror" .. san ..
      " -o embed embed.c $(" .. pc_env .. "pkg-config --cflags --libs luamp) 2>&1")
    assert.equal(0, rc, log)
    local out, rc2 = H.sh("cd / && ASAN_OPTIONS=detect_leaks=0 LD_LIBRARY_PATH=" .. H.q(prefix .. "/lib") ..
      " " .. H.q(dir .. "/embed"))
    assert.equal(0, rc2)
    assert.equal(expected, out)
  end)

  it("installs the man page, which documents every option the program accepts", function()
    local f = assert(io.open(prefix .. "/share/man/man1/luamp.1"), "luamp.1 not installed")
    local man = f:read("a")
    f:close()
    -- the usage text lists the options; an unknown option prints it
    local _, usage = H.run({"-Z"})
    local n = 0
    for opt in usage:gmatch("\n  (%-%S*)") do
      n = n + 1
      local roff = opt:gsub("%-", "\\-")
      assert.truthy(man:find("\n.B[I]? " .. roff:gsub("%p", "%%%0") .. "[\n ]"), "luamp.1 lacks option " .. opt)
    end
    assert.is_true(n >= 8, "usage text not understood")
    local out = H.sh("MANWIDTH=80 man -l " .. H.q(prefix .. "/share/man/man1/luamp.1") .. " 2>&1")
    assert.truthy(out:find("LUAMP_HISTORY", 1, true))
  end)
end)
