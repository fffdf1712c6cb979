"""Starting `multiecho serve` from the Python scripts in this folder.

`running(model, *args)` starts the release build on a free loopback port, waits until it
announces its listeners on `--ready-fd` (a pipe: no sleeping, no log parsing), keeps reading
its log so it never blocks writing it, and stops it (SIGTERM) when the block ends.
"""
import collections
import contextlib
import os
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "multiecho")


def require_binary():
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: run cargo build --release first")


@contextlib.contextmanager
def running(model, *args):
    """Yields (process, host, port) of a running server."""
    env = dict(os.environ, RUST_LOG="info")
    ready_read, ready_write = os.pipe()
    server = subprocess.Popen([BIN, "serve", "--model", model, "--listen", "127.0.0.1:0",
                               "--ready-fd", str(ready_write), *args],
                              stderr=subprocess.PIPE, text=True, env=env,
                              pass_fds=(ready_write,))
    os.close(ready_write)
    try:
        log = collections.deque(maxlen=20)  # its last lines, for an error message
        reader = threading.Thread(target=lambda: log.extend(server.stderr), daemon=True)
        reader.start()
        # "KIND ADDR" per listener; the server closes the pipe once every listener accepts.
        with os.fdopen(ready_read) as ready:
            lines = ready.read().splitlines()
        if not lines:
            server.wait(timeout=30)
            reader.join(timeout=5)
            sys.exit(f"{model}: the server did not start:\n" + "".join(log))
        addr = lines[0].split(" ", 1)[1]
        host, port = addr.rsplit(":", 1)
        yield server, host, int(port)
    finally:
        server.terminate()
        server.wait(timeout=30)
