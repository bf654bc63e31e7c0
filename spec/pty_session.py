#!/usr/bin/env python3
"""Runs a program on a pseudo-terminal and plays a script against it, for the specs that
test interactive behaviour (line editing, Ctrl-C, Ctrl-D) for real.

    python3 spec/pty_session.py STEPS_FILE -- program args...

STEPS_FILE has one step per line:
    send TEXT      write TEXT, a Python string literal of bytes ('1+1\\r', '\\x03', UTF-8
                   as '\\xc3\\xa9')
    expect REGEX   wait until the output not yet consumed matches REGEX (a literal of
                   bytes too); the output up to the end of the match is consumed
    raw            wait until the terminal is in non-canonical mode: libedit is reading
                   keys (typed before that, ^C and ^D act as in a cooked terminal)
    signal NAME    send signal NAME (e.g. INT) to the program
    exit CODE      wait for the program to end with status CODE (-N: killed by signal N)
    show           print everything the program wrote so far, between lines "<<<OUTPUT"
                   and "OUTPUT>>>" (for checks a regular expression cannot make)
Every wait gives up after TIMEOUT seconds (the machine may be loaded). On success
prints "PASS"; on failure prints the failing step and the output seen, and exits 1.
"""
import ast
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import fcntl
import time

TIMEOUT = 30.0


def as_bytes(literal):
    """A Python string literal whose characters are all bytes (\\xNN escapes)."""
    return ast.literal_eval(literal).encode("latin-1")


def main():
    steps_file, sep, *cmd = sys.argv[1:]
    assert sep == "--" and cmd, __doc__
    steps = [line.rstrip("\n").split(" ", 1) for line in open(steps_file) if line.strip()]
    env = dict(os.environ, TERM="xterm", LANG="C.UTF-8", LC_ALL="C.UTF-8")
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(cmd[0], cmd, env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    out = b""         # everything the program wrote
    pos = 0           # how much of it earlier expects consumed
    eof = False

    def pump(deadline):
        nonlocal out, eof
        left = deadline - time.monotonic()
        if eof or left <= 0:
            return False
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            return False
        try:
            data = os.read(fd, 4096)
        except OSError:       # EIO: the program closed the terminal
            data = b""
        if not data:
            eof = True
            return False
        out += data
        return True

    def fail(step):
        text = out.decode("utf-8", "replace")
        print("FAIL at step %r\n--- output (consumed up to %d) ---\n%s" % (step, pos, text))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        sys.exit(1)

    for step in steps:
        verb, arg = step[0], step[1] if len(step) > 1 else ""
        deadline = time.monotonic() + TIMEOUT
        if verb == "send":
            os.write(fd, as_bytes(arg))
        elif verb == "expect":
            rx = re.compile(as_bytes(arg))
            while True:
                m = rx.search(out, pos)
                if m:
                    pos = m.end()
                    break
                if not pump(deadline) and (eof or time.monotonic() >= deadline):
                    fail(step)
        elif verb == "raw":
            # on Linux the master reports the slave's modes
            while termios.tcgetattr(fd)[3] & termios.ICANON:
                if time.monotonic() >= deadline:
                    fail(step)
                time.sleep(0.005)
        elif verb == "signal":
            os.kill(pid, getattr(signal, "SIG" + arg))
        elif verb == "exit":
            status = None
            while time.monotonic() < deadline:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(st)
                    break
                # keep reading so the program never blocks on a full terminal
                if not pump(min(deadline, time.monotonic() + 0.05)) and eof:
                    time.sleep(0.02)
            if status != int(arg):
                print("exit status %r, expected %s" % (status, arg))
                fail(step)
        elif verb == "show":
            sys.stdout.write("<<<OUTPUT\n")
            sys.stdout.flush()
            sys.stdout.buffer.write(out)
            sys.stdout.write("\nOUTPUT>>>\n")
        else:
            fail(step)
    print("PASS")


main()
