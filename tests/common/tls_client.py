#!/usr/bin/env python3
"""A TLS echo client on Python's ssl module (OpenSSL), for tests/tls.rs.

Sends standard input over TLS to HOST:PORT while reading the echo (a non-blocking socket
driving an ssl.SSLObject, so neither side waits on the other), then ends the way --end says:

  close_notify  send close_notify right after the last byte, *before* the echo is in, and
                read until the server's close_notify: the TLS half-close.
  truncate      read the whole echo, then close TCP without close_notify.
  refused       expect no echo: the handshake or the first read must fail.

Prints one line: "echo LEN SHA256 VERSION" (or "refused REASON"), and exits 0; any other
outcome is an error message and exit 1.
"""

import argparse
import hashlib
import select
import socket
import ssl
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("host")
parser.add_argument("port", type=int)
parser.add_argument("--ca", help="verify the server against this CA file (default: no verification)")
parser.add_argument("--name", default="localhost", help="the server name to send and check")
parser.add_argument("--cert", help="client certificate (mutual TLS)")
parser.add_argument("--key", help="client key (mutual TLS)")
parser.add_argument("--end", choices=["close_notify", "truncate", "refused"], default="close_notify")
parser.add_argument("--proxy-header", help="a PROXY v1 header line to send before the handshake")
parser.add_argument("--max-version", choices=["1.2", "1.3"])
parser.add_argument("--timeout", type=float, default=30.0)
args = parser.parse_args()

data = sys.stdin.buffer.read() if args.end != "refused" else b"hello\n"

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
if args.ca:
    ctx.load_verify_locations(args.ca)
else:
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
if args.cert:
    ctx.load_cert_chain(args.cert, args.key)
if args.max_version == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2

incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(incoming, outgoing, server_hostname=args.name)
sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
sock.setblocking(False)

out = bytearray()
if args.proxy_header:
    # Sent together with the first flight: the server gets the header and the ClientHello in
    # one segment, and must keep what followed the header.
    out += (args.proxy_header + "\r\n").encode()
handshaken = False
sent = 0
close_sent = False
echo = bytearray()
peer_closed = False  # close_notify from the server
eof = False  # TCP end of stream
deadline = time.monotonic() + args.timeout


def fail(message):
    # What OpenSSL queued (an alert telling the server why) goes out first, as any client's.
    try:
        sock.setblocking(True)
        sock.sendall(out + outgoing.read())
    except OSError:
        pass
    if args.end == "refused":
        print(f"refused {message}")
        sys.exit(0)
    print(f"error: {message} (after {len(echo)} of {len(data)} bytes echoed)", file=sys.stderr)
    sys.exit(1)


while True:
    try:
        if not handshaken:
            try:
                tls.do_handshake()
                handshaken = True
            except ssl.SSLWantReadError:
                pass
        if handshaken:
            # Read first: OpenSSL's shutdown must not meet an unread record (it would take
            # application data after our close_notify for an error; SSL_read takes it).
            while True:
                try:
                    chunk = tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    peer_closed = True
                    break
                if not chunk:
                    peer_closed = True
                    break
                echo += chunk
            while sent < len(data) and len(out) < (1 << 20):
                sent += tls.write(data[sent : sent + 16384])
                out += outgoing.read()
            if sent == len(data) and args.end == "close_notify" and not close_sent:
                close_sent = True
                try:
                    tls.unwrap()
                except ssl.SSLWantReadError:
                    pass
    except ssl.SSLError as e:
        fail(f"TLS error: {e}")
    out += outgoing.read()

    if args.end == "truncate" and handshaken and len(echo) == len(data):
        sock.close()
        print(f"echo {len(echo)} {hashlib.sha256(echo).hexdigest()} {tls.version()}")
        sys.exit(0)
    if peer_closed or eof:
        break
    left = deadline - time.monotonic()
    if left <= 0:
        fail("timed out")
    readable, writable, _ = select.select([sock], [sock] if out else [], [], left)
    if writable:
        try:
            n = sock.send(out)
            del out[:n]
        except (BrokenPipeError, ConnectionResetError) as e:
            fail(f"send failed: {e}")
    if readable:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError as e:
            fail(f"connection reset: {e}")
        if chunk:
            incoming.write(chunk)
        else:
            incoming.write_eof()
            eof = True
            # Whatever was buffered before the end is still read out below.
            try:
                while True:
                    chunk = tls.read(65536)
                    if not chunk:
                        peer_closed = True
                        break
                    echo += chunk
            except ssl.SSLZeroReturnError:
                peer_closed = True
            except (ssl.SSLWantReadError, ssl.SSLEOFError, ssl.SSLError):
                pass

if args.end == "refused":
    if echo:
        print(f"error: served {len(echo)} bytes though a refusal was expected", file=sys.stderr)
        sys.exit(1)
    fail("closed by the server" + (" with close_notify" if peer_closed else ""))
if not peer_closed:
    fail("the server closed TCP without close_notify")
# After its close_notify the server closes: the socket must reach end of stream.
sock.setblocking(True)
sock.settimeout(max(deadline - time.monotonic(), 0.1))
try:
    rest = sock.recv(1)
except (ConnectionResetError, socket.timeout) as e:
    fail(f"no end of stream after close_notify: {e}")
if rest:
    fail("bytes after close_notify")
print(f"echo {len(echo)} {hashlib.sha256(echo).hexdigest()} {tls.version()}")
