"""The floor: a bare pyzmq ROUTER/DEALER echo with msgpack, on the same transport and security.

``python -m bench.floor BIND RUN_DIR`` serves an echo that decodes each request
and encodes a reply of the kernel's shape, with CURVE like the kernel. The
client side (``measure``) times round trips one at a time and pipelined.
"""

from __future__ import annotations

import sys
import time

import msgpack
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from protocol import keys


def serve(bind: str, run_dir: str) -> None:
    ctx = zmq.Context()
    ctx.linger = 0
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    pub, sec = keys.load_keypair(run_dir, "kernel")
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_publickey = pub
    sock.curve_secretkey = sec
    sock.bind(bind)
    print("ready", flush=True)
    packb, unpackb = msgpack.packb, msgpack.unpackb
    while True:
        rid, payload = sock.recv_multipart(copy=False)
        _ = payload.get("User-Id")  # the kernel reads it too
        req = unpackb(payload.bytes)
        sock.send_multipart([rid.bytes, packb({"v": 1, "id": req["id"], "ok": True, "result": {"pages": 1}})])


def dealer(ctx: zmq.Context, endpoint: str, run_dir: str, name: str = "client-0") -> zmq.Socket:
    pub, sec = keys.load_keypair(run_dir, name)
    s = ctx.socket(zmq.DEALER)
    s.curve_serverkey = keys.public_key(run_dir, "kernel")
    s.curve_publickey = pub
    s.curve_secretkey = sec
    s.connect(endpoint)
    return s


def measure(endpoint: str, run_dir: str, seconds: float, window: int = 1) -> float:
    """Round trips per second of a map-shaped request, ``window`` in flight."""
    ctx = zmq.Context()
    ctx.linger = 0
    s = dealer(ctx, endpoint, run_dir)
    packb, unpackb = msgpack.packb, msgpack.unpackb
    args = {"pid": 1, "vaddr": 0x1000_0000, "frames": [[5000, 1]], "prot": 3}
    s.send(packb({"v": 1, "id": 0, "call": "map", "args": args}))
    s.recv()  # connected and authenticated
    n = 0
    for i in range(window):
        s.send(packb({"v": 1, "id": i + 1, "call": "map", "args": args}))
    t0 = time.perf_counter()
    end = t0 + seconds
    i = window
    while True:
        unpackb(s.recv())
        n += 1
        if time.perf_counter() >= end:
            break
        i += 1
        s.send(packb({"v": 1, "id": i, "call": "map", "args": args}))
    rate = n / (time.perf_counter() - t0)
    for _ in range(window - 1):
        s.recv()
    s.close(0)
    ctx.term()
    return rate


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
