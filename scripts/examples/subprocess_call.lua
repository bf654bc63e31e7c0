-- Port of the seeds' first subprocess example: run a command as if typed at the prompt.
--   import subprocess
--   print('$ nslookup www.python.org')
--   r = subprocess.call(['nslookup', 'www.python.org'])
--   print('Exit code:', r)
-- nslookup is not on a stock Debian (it comes with bind9-dnsutils) and needs the network;
-- getent (libc-bin, always installed) asks the same resolver, here for localhost so the
-- example also runs offline. Pass another name as the first argument.
local luamp = require "luamp"

local host = arg[1] or "localhost"
print("$ getent hosts " .. host)
local r = luamp.subprocess.call({"getent", "hosts", host})
print("Exit code:", r)
