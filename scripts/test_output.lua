-- A busted output handler for scripts/test.sh (busted -o scripts/test_output.lua).
--
-- Quiet when tests pass; prints each failure or error the moment it happens (file, line,
-- test name, message, traceback), flushed, so a run's output streams. It also keeps a
-- small status file (path in LUAMP_TEST_STATUS) up to date, which test.sh reads:
--   line 1: "<passed> <failed> <errors> <pending> running|done"
--   line 2: the full name of the test running now (or last run)
--   line 3: its file and line
-- so that a file killed by its time limit can still say which test hung and how many
-- had passed, and a finished file reports its counts without parsing busted's text.
local pretty = require "pl.pretty"

return function(options)
  local busted = require "busted"
  local handler = require "busted.outputHandlers.base"()
  local status_path = os.getenv("LUAMP_TEST_STATUS")
  local current, where = "", ""

  local function write_status(state)
    if not status_path then return end
    local f = io.open(status_path, "w")
    if not f then return end
    f:write(("%d %d %d %d %s\n%s\n%s\n"):format(handler.successesCount, handler.failuresCount,
      handler.errorsCount, handler.pendingsCount, state, current, where))
    f:close()
  end

  local function message_of(m)
    if type(m) == "string" then return m end
    if m == nil then return "nil error" end
    local mt = getmetatable(m)
    if mt and mt.__tostring then return tostring(m) end
    return pretty.write(m)
  end

  local function report(what, t)
    local trace = t.element.trace
    local at = trace and trace.short_src and (trace.short_src .. ":" .. trace.currentline) or "?"
    local lines = {("%s %s: %s"):format(what, at, t.name), message_of(t.message)}
    if t.trace and t.trace.traceback then
      lines[#lines + 1] = (t.trace.traceback:gsub("^\n", ""))
    end
    io.write((table.concat(lines, "\n"):gsub("\n?$", "\n")))
    io.flush()
  end

  handler.testStart = function(element)
    current = handler.getFullName(element)
    local trace = element.trace
    where = trace and trace.short_src and (trace.short_src .. ":" .. trace.currentline) or ""
    write_status("running")
    return nil, true
  end

  handler.testEnd = function(element, parent, status)
    if status == "failure" then report("FAILED", handler.failures[#handler.failures])
    elseif status == "error" then report("ERROR", handler.errors[#handler.errors]) end
    write_status("running")
    return nil, true
  end

  -- errors outside an `it` (a file that does not load, a failing before_each, ...)
  handler.error = function(element)
    if element.descriptor ~= "it" then
      report("ERROR", handler.errors[#handler.errors])
      write_status("running")
    end
    return nil, true
  end

  handler.suiteEnd = function()
    write_status("done")
    return nil, true
  end

  busted.subscribe({"test", "start"}, handler.testStart, {predicate = handler.cancelOnPending})
  busted.subscribe({"test", "end"}, handler.testEnd, {predicate = handler.cancelOnPending})
  busted.subscribe({"error"}, handler.error)
  busted.subscribe({"failure"}, handler.error)
  busted.subscribe({"suite", "end"}, handler.suiteEnd)
  return handler
end
