-- The rockspec installs luamp the LuaRocks way: `luarocks --lua-version 5.4 make` in the
-- clone, into a throwaway rocks tree, after which stock lua5.4 finds the module and the
-- tree's bin has the luamp program, with nothing but the tree's own paths. The build
-- directory (build.luarocks/, ignored by git) stays between runs so that later runs only
-- rebuild what changed (one run at a time: see the lock below).
local H = require "helper"

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local function rockspecs()
  local list = {}
  local p = io.popen("ls " .. H.q(H.root) .. " | grep '^luamp-.*\\.rockspec$'")
  for name in p:lines() do list[#list + 1] = name end
  p:close()
  return list
end

describe("the rockspec", function()
  it("is the only one, and its version is the project's", function()
    local specs = rockspecs()
    assert.same({"luamp-0.1.0-1.rockspec"}, specs)
    local spec = read(H.root .. "/" .. specs[1])
    local cmake_version = read(H.root .. "/CMakeLists.txt"):match("project%(luamp VERSION ([%d%.]+)")
    local header_version = read(H.root .. "/runtime/luamp.h"):match('#define LUAMP_VERSION "([%d%.]+)"')
    assert.equal(cmake_version, header_version)
    assert.equal(cmake_version .. "-1", spec:match('\nversion = "([^"]+)"'))
    assert.equal("luamp-" .. cmake_version .. "-1.rockspec", specs[1])
    assert.equal(cmake_version, H.luamp.version)
  end)

  it("installs with `luarocks make` into a fresh tree where lua5.4 and luamp find it", function()
    local tree = os.tmpname()
    os.remove(tree)
    local log = os.tmpname()
    finally(function() H.sh("rm -rf " .. H.q(tree) .. " " .. H.q(log)) end)
    -- one build at a time in build.luarocks/: two runs of this spec at once (the plain and
    -- the sanitized suite in one clone) would share its CMake cache, whose install prefix
    -- is the last configure's, and one run's luamp.so would land in the other's tree
    local _, code = H.sh("cd " .. H.q(H.root) .. " && mkdir -p build.luarocks && " ..
      "CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) flock build.luarocks/.spec.lock " ..
      "luarocks --lua-version 5.4 --tree " .. H.q(tree) .. " make > " .. H.q(log) .. " 2>&1")
    assert.equal(0, code, read(log))
    assert.truthy(io.open(tree .. "/lib/lua/5.4/luamp.so"), "luamp.so is not in the tree")
    assert.falsy(io.open(tree .. "/lib/lua/5.4/libluamp.so"), "embedding files leaked into the tree")

    -- only the tree's paths: a clean environment, run from / so that ./?.so finds nothing
    local paths = "env -i PATH=/usr/bin:/bin sh -c " .. H.q(
      'eval "$(luarocks --lua-version 5.4 --tree ' .. H.q(tree) .. ' path --bin)" && cd / && ' ..
      [[lua5.4 -e 'local l = require "luamp"; print(l.version, package.searchpath("luamp", package.cpath))' && ]] ..
      [[luamp -e 'print(luamp.Pool(2):map(function(x) return x * x end, {1, 2, 3})[3])']])
    local out, code2 = H.sh(paths .. " 2>&1")
    assert.equal(0, code2, out)
    assert.equal(H.luamp.version .. "\t" .. tree .. "/lib/lua/5.4/luamp.so\n9\n", out)
  end)
end)
