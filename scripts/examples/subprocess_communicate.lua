-- Port of the seeds' second subprocess example: feed a child its input via communicate.
--   import subprocess
--   print('$ nslookup')
--   p = subprocess.Popen(['nslookup'], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
--                        stderr=subprocess.PIPE)
--   output, err = p.communicate(b'set q=mx\npython.org\nexit\n')
--   print(output.decode('utf-8'))
--   print('Exit code:', p.returncode)
-- nslookup (not on a stock Debian, and it needs the network) reads commands from its
-- stdin; sh plays the same part here: a program that takes commands on stdin, answers on
-- stdout and ends at `exit`.
local luamp = require "luamp"
local sp = luamp.subprocess

print("$ sh")
local p = sp.Popen({"sh"}, {stdin = sp.PIPE, stdout = sp.PIPE, stderr = sp.PIPE})
local output, err = p:communicate("cd /\npwd\necho hello from sh\nexit\n")
print(output)
if err ~= "" then io.stderr:write(err) end
print("Exit code:", p.returncode)
