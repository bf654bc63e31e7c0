-- Port of the "run each job with a time limit" pattern (Python: pebble's
-- ProcessPool.schedule(job, timeout=...), or apply_async + get(timeout) + a pool
-- restart). Each job gets {timeout = limit}: a job over its limit has its worker killed
-- and replaced, and only its own get raises Timeout; the others finish normally.
-- (The seed's jobs sleep 1, 10 and 2 s with a 5 s limit; pass a time scale as the first
-- argument.)
local luamp = require "luamp"
local scale = tonumber(arg and arg[1]) or 1

local function job(seconds)
  luamp.sleep(seconds)
  return seconds
end

local limit = 5 * scale
local pool <close> = luamp.Pool(2)
local results = {}
for i, seconds in ipairs {1 * scale, 10 * scale, 2 * scale} do
  results[i] = pool:apply_async(job, {seconds}, {timeout = limit})
end
for i, res in ipairs(results) do
  local ok, err = pcall(res.get, res)
  if ok then
    print(string.format("job %d: finished", i))
  elseif type(err) == "table" and err.kind == luamp.errors.Timeout then
    print(string.format("job %d: took longer than %g s, stopped", i, limit))
  else
    error(err, 0)
  end
end
pool:close()
pool:join()
print("all jobs done")
