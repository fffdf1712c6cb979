#!/usr/bin/env python3
"""The fault matrix: every hostile row against every model, bounded, printed as a Markdown table
(RELIABILITY.md publishes one run). `cargo test --test signals` holds its quick rows.

    cargo build --release && python3 scripts/fault-matrix.py [--models epoll,uring] [--rows ...]

Each cell is `ok` (with a figure where the row measures one), `by design` where the model's
documented limit is what the row shows (one slow client per worker stalls iterative, prefork
and pool), `skip` with the reason, or `FAIL` with what went wrong; the exit status is 1 if any
cell failed. Every server runs on a free loopback port (IPv6: ::1); nothing leaves the machine.
Each row is bounded in clients, bytes and time, so the whole matrix takes about 10 minutes.
"""
import argparse
import hashlib
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "multiecho")
MODELS = ["iterative", "process", "prefork", "thread", "pool", "epoll", "async", "uring"]
ONE_PER_WORKER = {"iterative", "prefork", "pool"}
FORKS = {"process", "prefork"}


class Fail(Exception):
    pass


class Skip(Exception):
    pass


class Server:
    """`multiecho serve` on a free port; its log is kept, its processes can be listed."""

    def __init__(self, model, *args, listen="127.0.0.1:0", nofile=None):
        def limit():
            os.setpgid(0, 0)  # its own process group: group signals reach nothing else
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        env = dict(os.environ, RUST_LOG="info")
        self.model = model
        self.proc = subprocess.Popen(
            [BIN, "serve", "--model", model, "--listen", listen, "--workers", "2", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=env, preexec_fn=limit)
        self.log = []
        addr = None
        for line in self.proc.stderr:
            self.log.append(line)
            if "listening on " in line:
                addr = line.split("listening on ", 1)[1].split()[0]
                break
        if addr is None:
            self.proc.wait()
            text = "".join(self.log)
            if "io_uring is not available" in text:
                raise Skip("no io_uring here")
            raise Fail("did not start: " + text.strip().splitlines()[-1:][0] if text else "no log")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host.strip("[]"), int(port)
        self.pid = self.proc.pid

    def _read(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def text(self):
        return "".join(self.log)

    def signal(self, sig):
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def processes(self):
        """The server and its descendants (their PIDs)."""
        pids = {self.pid}
        changed = True
        while changed:
            changed = False
            for entry in os.listdir("/proc"):
                if entry.isdigit() and int(entry) not in pids:
                    try:
                        stat = open(f"/proc/{entry}/stat").read()
                    except OSError:
                        continue
                    fields = stat.rsplit(")", 1)[1].split()
                    if fields[0] != "Z" and int(fields[1]) in pids:
                        pids.add(int(entry))
                        changed = True
        return {p for p in pids if alive(p)}

    def wait(self, timeout):
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        # The last lines may still be in the pipe: read them before anyone looks at the log.
        self.reader.join(timeout=5)
        return status

    def stop(self, timeout=15):
        self.signal(signal.SIGTERM)
        status = self.wait(timeout)
        if status is None:
            self.kill()
            raise Fail("no exit after SIGTERM")
        return status

    def kill(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def connect(self, timeout=10):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect((self.host, self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s


def alive(pid):
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def recv_exactly(s, n):
    chunks, got = [], 0
    while got < n:
        chunk = s.recv(min(1 << 20, n - got))
        if not chunk:
            raise Fail(f"closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def stream(s, data):
    """Sends `data` from a thread while reading the echo; returns what came back (EOF ends)."""
    def send():
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    sender = threading.Thread(target=send)
    sender.start()
    echoed = bytearray()
    try:
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            echoed += chunk
    except OSError:
        pass
    sender.join()
    return bytes(echoed)


def round_trips(server, seconds=2.0, size=64):
    """Round trips per second one well-behaved client gets (0 if it is never served)."""
    try:
        s = server.connect(timeout=seconds)
    except OSError:
        return 0.0
    msg = os.urandom(size)
    count, end = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            s.sendall(msg)
            if recv_exactly(s, size) != msg:
                raise Fail("a well-behaved client got wrong bytes")
            count += 1
    except (socket.timeout, OSError):
        pass
    finally:
        s.close()
    return count / seconds


def many(count, fn):
    """Runs fn(i) on `count` threads; returns the exceptions they raised."""
    errors = []

    def run(i):
        try:
            fn(i)
        except Exception as e:  # noqa: BLE001 - a row counts every failure
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def open_fds(server):
    total = 0
    for pid in server.processes():
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def port_free(port, family=socket.AF_INET, host="127.0.0.1"):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        s.listen()
        return True
    except OSError:
        return False
    finally:
        s.close()


# ---- the rows ------------------------------------------------------------------------------

def row_shutdown_mid_stream(model):
    """10 clients streaming 8 MiB each, SIGTERM mid-stream: every byte a served client sent
    comes back, the rest are reset (never a wrong byte), and the server exits 0."""
    server = Server(model, "--shutdown-timeout", "10s")
    payloads = [os.urandom(8 << 20) for _ in range(10)]
    outcome = {}

    def client(i):
        s = server.connect(timeout=20)
        echoed = stream(s, payloads[i])
        s.close()
        if echoed == payloads[i]:
            outcome[i] = "whole"
        elif payloads[i].startswith(echoed):
            outcome[i] = "cut"
        else:
            outcome[i] = "WRONG"
    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    server.signal(signal.SIGTERM)
    for t in threads:
        t.join()
    status = server.wait(20)
    if status != 0:
        server.kill()
        raise Fail(f"exit status {status}")
    values = list(outcome.values())
    if "WRONG" in values:
        raise Fail("a client got bytes it did not send")
    whole = values.count("whole")
    return f"ok: {whole}/10 whole, {10 - whole} refused or reset, exit 0"


def row_slowloris(model):
    """500 clients that send one byte and then nothing (a slow request that never ends): how
    many round trips per second a well-behaved client still gets."""
    server = Server(model)
    idle = []
    try:
        for _ in range(500):
            s = server.connect()
            s.sendall(b"x")
            idle.append(s)
        rate = round_trips(server)
    finally:
        for s in idle:
            s.close()
    after = round_trips(server, 1.0)
    server.stop()
    if after == 0:
        raise Fail("no service after the slow clients left")
    if rate == 0 and model in ONE_PER_WORKER:
        return "by design: 0 rt/s while they stay; served once they leave"
    if rate == 0:
        raise Fail("a well-behaved client got 0 rt/s")
    return f"ok: {rate:,.0f} rt/s alongside"


def row_never_reading(model):
    """80 clients each sending 1 MiB and never reading their echo: a well-behaved client's
    round trips per second meanwhile, and service after they leave."""
    server = Server(model)
    stuck = []
    try:
        for _ in range(80):
            s = server.connect()
            s.setblocking(False)
            stuck.append(s)
        blob = b"\x5a" * (1 << 20)
        for s in stuck:
            sent = 0
            deadline = time.monotonic() + 0.5
            while sent < len(blob) and time.monotonic() < deadline:
                try:
                    sent += s.send(blob[sent:])
                except BlockingIOError:
                    time.sleep(0.005)
        rate = round_trips(server)
    finally:
        for s in stuck:
            s.close()
    after = round_trips(server, 1.0)
    server.stop()
    if after == 0:
        raise Fail("no service after the stalled clients left")
    if rate == 0 and model in ONE_PER_WORKER:
        return "by design: 0 rt/s while they stay; served once they leave"
    if rate == 0:
        raise Fail("a well-behaved client got 0 rt/s")
    return f"ok: {rate:,.0f} rt/s alongside"


def row_connection_storm(model):
    """10,000 connections from 50 threads, each one short exact echo."""
    server = Server(model)
    failures = []

    def worker(i):
        for j in range(200):
            msg = struct.pack("!II", i, j)
            try:
                s = server.connect()
                s.sendall(msg)
                if recv_exactly(s, len(msg)) != msg:
                    failures.append("wrong bytes")
                s.close()
            except (OSError, Fail) as e:
                failures.append(str(e))
    started = time.monotonic()
    many(50, worker)
    took = time.monotonic() - started
    server.stop()
    if failures:
        raise Fail(f"{len(failures)}/10000 failed ({failures[0]})")
    return f"ok: 10,000 in {took:.1f} s"


def row_descriptor_limit(model):
    """The server limited to 64 open files, 150 clients at once: those over the limit wait or
    are closed, none gets a wrong byte, the server does not spin, and all is well afterwards."""
    server = Server(model, nofile=64)
    clients = []
    for _ in range(150):
        try:
            clients.append(server.connect(timeout=2))
        except OSError:
            break
    for s in clients:
        try:
            s.sendall(b"fd")
        except OSError:
            pass
    cpu_before = sum(cpu_ticks(p) for p in server.processes())
    time.sleep(1.0)
    cpu = sum(cpu_ticks(p) for p in server.processes()) - cpu_before
    for s in clients:
        s.close()
    time.sleep(0.3)
    after = round_trips(server, 1.0)
    server.stop()
    if cpu > 50:
        raise Fail(f"{cpu} CPU ticks in 1 s while out of descriptors: spinning")
    if after == 0:
        raise Fail("no service after the clients left")
    return f"ok: {cpu} ticks/s at the limit, served after"


def cpu_ticks(pid):
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError):
        return 0


def row_resets(model):
    """200 clients send 64 KiB and reset the connection (SO_LINGER 0) without reading: the
    others lose nothing and no descriptor leaks."""
    server = Server(model)
    base, _ = settled_baseline(server)

    def reset(i):
        s = server.connect()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            s.sendall(os.urandom(64 << 10))
        except OSError:
            pass
        s.close()
    many(200, reset)
    data = os.urandom(1 << 20)
    if stream(server.connect(), data) != data:
        server.kill()
        raise Fail("a client after the resets lost bytes")
    deadline = time.monotonic() + 5
    while open_fds(server) > base and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = open_fds(server) - base
    server.stop()
    if leaked > 0:
        raise Fail(f"{leaked} descriptors more than before")
    return "ok: 200 resets, nothing lost or leaked"


def row_signal_storm(model):
    """1,000 SIGUSR1 and SIGUSR2 at the server's whole process group while a client streams
    32 MiB: the stream is exact, the server logs status lines and keeps serving; then SIGHUP
    drains it and it exits 0."""
    server = Server(model, "--shutdown-timeout", "5s")
    data = os.urandom(32 << 20)
    result = {}
    t = threading.Thread(target=lambda: result.update(echo=stream(server.connect(30), data)))
    t.start()
    for i in range(1000):
        os.killpg(server.pid, signal.SIGUSR1 if i % 2 else signal.SIGUSR2)
    t.join()
    if result.get("echo") != data:
        server.kill()
        raise Fail("the stream lost or changed bytes during the storm")
    if round_trips(server, 0.5) == 0:
        server.kill()
        raise Fail("not serving after the storm")
    if "status (SIGUSR1)" not in server.text():
        server.kill()
        raise Fail("no status line for SIGUSR1")
    os.killpg(server.pid, signal.SIGHUP)
    status = server.wait(10)
    if status != 0:
        server.kill()
        raise Fail(f"SIGHUP: exit status {status}")
    if "shutting down" not in server.text():
        raise Fail("SIGHUP did not drain")
    return "ok: exact; SIGHUP drained, exit 0"


def row_binary_large(model):
    """A 1 GiB random binary stream, compared by SHA-256 on both sides, and a burst of 1-byte
    writes."""
    server = Server(model)
    s = server.connect(60)
    sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
    total = 1 << 30

    def send():
        for _ in range(total >> 20):
            chunk = os.urandom(1 << 20)
            sent_hash.update(chunk)
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
    started = time.monotonic()
    sender = threading.Thread(target=send)
    sender.start()
    got = 0
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got_hash.update(chunk)
        got += len(chunk)
    sender.join()
    took = time.monotonic() - started
    s.close()
    if got != total or sent_hash.digest() != got_hash.digest():
        server.kill()
        raise Fail(f"sha256 differs ({got} of {total} bytes)")
    s = server.connect()
    tiny = bytes(range(256))
    for b in tiny:
        s.send(bytes([b]))
    if recv_exactly(s, 256) != tiny:
        server.kill()
        raise Fail("1-byte writes came back wrong")
    s.close()
    server.stop()
    return f"ok: 1 GiB sha256 exact, {total / took / 1e6:,.0f} MB/s"


def settled_baseline(server):
    """Descriptors and processes once the server has served a few clients (so its workers
    finished starting)."""
    for _ in range(20):
        round_trips(server, 0.01)
    time.sleep(0.5)
    return open_fds(server), len(server.processes())


def row_churn(model):
    """5,000 connections one after the other (connect, echo, close): no descriptor or process
    leaks."""
    server = Server(model)
    base_fds, base_procs = settled_baseline(server)
    for i in range(5000):
        s = server.connect()
        msg = struct.pack("!I", i)
        s.sendall(msg)
        if recv_exactly(s, 4) != msg:
            server.kill()
            raise Fail("wrong bytes")
        s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (open_fds(server) > base_fds
                                           or len(server.processes()) > base_procs):
        time.sleep(0.05)
    fds, procs = open_fds(server) - base_fds, len(server.processes()) - base_procs
    server.stop()
    if fds > 0 or procs > 0:
        raise Fail(f"{fds} more descriptors, {procs} more processes")
    return "ok: 5,000, no leak"


def row_ipv6(model):
    """Listening on [::1]: exact echo of 1 MiB."""
    if not socket.has_ipv6:
        raise Skip("no IPv6")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        raise Skip("no ::1 here")
    server = Server(model, listen="[::1]:0")
    data = os.urandom(1 << 20)
    echoed = stream(server.connect(), data)
    server.stop()
    if echoed != data:
        raise Fail("bytes differ")
    return "ok"


def busy_server(model):
    server = Server(model, "--shutdown-timeout", "3s")
    s = server.connect()
    s.sendall(b"hi")
    if recv_exactly(s, 2) != b"hi":
        raise Fail("no first echo")
    return server, s


def row_parent_sigkill(model):
    """SIGKILL to the server while a client is busy: the port is free for a restart within
    1 s, and no process of the server runs 3 s + 2.5 s later (shutdown timeout 3 s)."""
    server, s = busy_server(model)
    procs = server.processes()
    server.signal(signal.SIGKILL)
    server.proc.wait(5)  # not wait(): the orphans still hold the log pipe
    t0 = time.monotonic()
    while not port_free(server.port):
        if time.monotonic() - t0 > 1:
            server.kill()
            raise Fail("port still held 1 s after SIGKILL")
        time.sleep(0.02)
    freed = time.monotonic() - t0
    while any(alive(p) for p in procs):
        if time.monotonic() - t0 > 5.5:
            server.kill()
            raise Fail("a child outlived its parent")
        time.sleep(0.02)
    s.close()
    return f"ok: port free in {freed * 1000:.0f} ms, all gone in {time.monotonic() - t0:.1f} s"


def row_forced_sigint(model):
    """SIGINT twice while a client is busy: exit 130 and every process gone within 1.5 s."""
    server, s = busy_server(model)
    procs = server.processes()
    server.signal(signal.SIGINT)
    deadline = time.monotonic() + 5
    while "shutting down" not in server.text() and time.monotonic() < deadline:
        time.sleep(0.01)
    server.signal(signal.SIGINT)
    t0 = time.monotonic()
    status = server.wait(5)
    while any(alive(p) for p in procs):
        if time.monotonic() - t0 > 1.5:
            server.kill()
            raise Fail("a process outlived the forced exit")
        time.sleep(0.01)
    s.close()
    if status != 130:
        raise Fail(f"exit status {status}, not 130")
    return f"ok: 130, all gone in {(time.monotonic() - t0) * 1000:.0f} ms"


def row_group_sighup(model):
    """SIGHUP to the whole process group (a terminal closing) while a client is busy: nothing
    dies of it; the client is still served, then the server drains and exits 0."""
    server, s = busy_server(model)
    os.killpg(server.pid, signal.SIGHUP)
    time.sleep(0.3)
    try:
        s.sendall(b"again")
        if recv_exactly(s, 5) != b"again":
            raise Fail("wrong bytes")
    except OSError as e:
        server.kill()
        raise Fail(f"the busy client was cut off: {e}")
    s.close()
    status = server.wait(8)
    if status != 0:
        server.kill()
        raise Fail(f"exit status {status}")
    return "ok: drained, exit 0"


ROWS = [
    ("shutdown mid-stream", row_shutdown_mid_stream),
    ("slowloris (500)", row_slowloris),
    ("never-reading (80 x 1 MiB)", row_never_reading),
    ("connection storm", row_connection_storm),
    ("descriptor limit (64)", row_descriptor_limit),
    ("resets", row_resets),
    ("signal storm + SIGHUP", row_signal_storm),
    ("binary, 1 GiB stream", row_binary_large),
    ("churn", row_churn),
    ("IPv6", row_ipv6),
    ("parent SIGKILL", row_parent_sigkill),
    ("forced second SIGINT", row_forced_sigint),
    ("SIGHUP to the group", row_group_sighup),
]


def run_cell(fn, model, budget):
    """Runs one cell with a time budget; the cell's text."""
    result = {}

    def target():
        try:
            result["text"] = fn(model)
        except Skip as e:
            result["text"] = f"skip: {e}"
        except Fail as e:
            result["text"] = f"FAIL: {e}"
        except Exception as e:  # noqa: BLE001 - a cell reports what broke, the matrix goes on
            result["text"] = f"FAIL: {type(e).__name__}: {e}"
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(budget)
    return result.get("text", f"FAIL: still running after {budget} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rows", default="", help="comma-separated row numbers (1-based)")
    parser.add_argument("--budget", type=float, default=60, help="seconds per cell")
    args = parser.parse_args()
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: run cargo build --release first")
    models = args.models.split(",")
    rows = ROWS if not args.rows else [ROWS[int(i) - 1] for i in args.rows.split(",")]
    started = time.monotonic()
    table = {}
    for name, fn in rows:
        for model in models:
            text = run_cell(fn, model, args.budget)
            table[(name, model)] = text
            print(f"{name} / {model}: {text}", file=sys.stderr, flush=True)
    took = time.monotonic() - started
    print(f"| row | {' | '.join(models)} |")
    print(f"|---|{'---|' * len(models)}")
    for name, _ in rows:
        print(f"| {name} | {' | '.join(table[(name, m)] for m in models)} |")
    print(f"\n{len(rows)} rows x {len(models)} models in {took / 60:.1f} min")
    sys.exit(1 if any(v.startswith("FAIL") for v in table.values()) else 0)


if __name__ == "__main__":
    main()
