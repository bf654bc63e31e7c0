-- check_layers.lua — the runtime's files depend only downward (ctest test_layers).
--
--   lua5.4 scripts/check_layers.lua build/libluamp.a
--
-- Reads, with nm, which global symbols each object of the library defines and which it
-- uses, and so which runtime file calls which. Fails (exit 1, naming the calls) when a
-- file uses a symbol of a file in a higher layer, when the calls within a layer go round
-- in a circle, or when an object is in no layer (a new runtime/*.c must be placed here
-- and in docs/design.md, "Layers", which this table mirrors). Before reading the
-- library it checks itself on a made-up graph with both faults, so it cannot pass by
-- finding nothing.

-- Lowest first. A file may call files of its own layer (without a circle) and below.
local LAYERS = {
  {"base", {"base", "loop", "alloc", "luamp_embedded", "luamp_bytecode"}},   -- lua/ as C data (source, bytecode)
  {"services", {"error", "wait", "interrupt", "sched"}},
  {"codec", {"handles", "codec", "bytecode"}},
  {"objects", {"arena", "sync", "shared", "connection", "queue", "auth", "redis",
               "subprocess", "ring", "pool", "process"}},
  {"entry", {"repl", "module", "spawn", "forkserver"}},   -- luaopen_luamp and the mains
}

local function layer_of_table(layers)
  local t = {}
  for i, l in ipairs(layers) do
    for _, f in ipairs(l[2]) do t[f] = i end
  end
  return t
end

-- edges[a][b] = {symbols a uses that b defines}; returns a list of problems.
local function check(layers, files, edges)
  local layer = layer_of_table(layers)
  local problems = {}
  for _, f in ipairs(files) do
    if not layer[f] then
      problems[#problems + 1] = ("%s is in no layer: add it to LAYERS in scripts/check_layers.lua"
        .. " and to docs/design.md"):format(f)
    end
  end
  for _, a in ipairs(files) do
    for b, syms in pairs(edges[a] or {}) do
      if layer[a] and layer[b] and layer[b] > layer[a] then
        problems[#problems + 1] = ("%s (layer %s) calls up into %s (layer %s): %s"):format(
          a, layers[layer[a]][1], b, layers[layer[b]][1], table.concat(syms, ", "))
      end
    end
  end
  -- circles: depth-first search over the whole graph (an upward call closes a circle
  -- too, but is reported above already; this finds those within one layer)
  local state, stack = {}, {}
  local function visit(a)
    state[a] = "open"
    stack[#stack + 1] = a
    local targets = {}
    for b in pairs(edges[a] or {}) do targets[#targets + 1] = b end
    table.sort(targets)
    for _, b in ipairs(targets) do
      if state[b] == "open" then
        local from
        for i, x in ipairs(stack) do if x == b then from = i end end
        local circle = {table.unpack(stack, from)}
        circle[#circle + 1] = b
        problems[#problems + 1] = "circle: " .. table.concat(circle, " -> ")
      elseif not state[b] then
        visit(b)
      end
    end
    stack[#stack] = nil
    state[a] = "done"
  end
  for _, f in ipairs(files) do if not state[f] then visit(f) end end
  return problems
end

-- The checker must see both faults in a graph that has them.
do
  local layers = {{"low", {"a", "b"}}, {"high", {"c"}}}
  local bad = check(layers, {"a", "b", "c", "d"}, {
    a = {b = {"sym_b"}}, b = {a = {"sym_a"}}, c = {a = {"sym_a"}}, d = {},
  })
  local good = check(layers, {"a", "b", "c"}, {a = {b = {"x"}}, c = {a = {"y"}}})
  local up = check(layers, {"a", "c"}, {a = {c = {"z"}}})
  local text = table.concat(bad, "\n")
  if #good ~= 0 or #up ~= 1 or not up[1]:find("calls up into c", 1, true)
     or not text:find("circle: a -> b -> a", 1, true) or not text:find("d is in no layer", 1, true) then
    io.stderr:write("check_layers: the checker's own check failed\n", text, "\n")
    os.exit(2)
  end
end

local archive = assert(arg[1], "usage: lua5.4 check_layers.lua path/to/libluamp.a")
local nm = assert(io.popen("nm -A " .. ("%q"):format(archive) .. " 2>/dev/null"))
local defs, uses, files, seen = {}, {}, {}, {}
for line in nm:lines() do
  -- libluamp.a:arena.c.o:0000000000000000 T luamp_ref_alloc   /   ...:          U luamp_raise
  local member, kind, sym = line:match("^.-:([^:/]+)%.c%.o:%s*%x*%s+(%a)%s+(%S+)$")
  if member then
    if not seen[member] then seen[member] = true; files[#files + 1] = member end
    if kind == "U" then
      uses[member] = uses[member] or {}
      uses[member][#uses[member] + 1] = sym
    elseif kind:match("%u") or kind == "w" or kind == "v" then
      defs[sym] = defs[sym] or member
    end
  end
end
local ok = nm:close()
if not ok or #files == 0 then
  io.stderr:write("check_layers: nm found no objects in ", archive, "\n")
  os.exit(2)
end
table.sort(files)

local edges = {}
for _, a in ipairs(files) do
  edges[a] = {}
  for _, sym in ipairs(uses[a] or {}) do
    local b = defs[sym]
    if b and b ~= a then
      edges[a][b] = edges[a][b] or {}
      table.insert(edges[a][b], sym)
    end
  end
end

local problems = check(LAYERS, files, edges)
if #problems > 0 then
  io.stderr:write("check_layers: the runtime's layers are broken (docs/design.md, \"Layers\"):\n")
  for _, p in ipairs(problems) do io.stderr:write("  ", p, "\n") end
  os.exit(1)
end
print(("check_layers: %d files, every call goes down a layer or within one, no circle"):format(#files))
