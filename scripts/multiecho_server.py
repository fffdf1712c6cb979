"""Starting `multiecho serve` from the Python scripts in this folder.

`running(model, *args)` starts the release build on a free loopback port, waits for its
"listening on" line (no sleeping), keeps reading its log so it never blocks writing it, and
stops it (SIGTERM) when the block ends.
"""
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
    server = subprocess.Popen([BIN, "serve", "--model", model, "--listen", "127.0.0.1:0", *args],
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        addr = None
        for line in server.stderr:
            if "listening on " in line:
                addr = line.split("listening on ", 1)[1].split()[0]
                break
        if addr is None:
            sys.exit(f"{model}: the server did not start")
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        host, port = addr.rsplit(":", 1)
        yield server, host, int(port)
    finally:
        server.terminate()
        server.wait(timeout=30)
