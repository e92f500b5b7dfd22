"""The floor: a bare pyzmq ROUTER/DEALER echo with msgpack, on the same transport and security.

``python -m bench.floor --bind ENDPOINT --run-dir RUN`` serves an echo with
the kernel's key pair and CURVE, as the kernel does (ZAP handler, User-Id read
from every frame, the same socket options). Each request is decoded and
answered with a reply of the kernel's shape and size for that call (the
results in ``RUN/floor.replies``, msgpack ``{call: result}``, written by
``Floor(replies=...)``: a benchmark passes the results the kernel itself gave
for the very requests it times; ``REPLIES`` otherwise), decoded and encoded
with the servers' own ``protocol.wire`` functions (``wire.Replies``, as the
kernel's service); no validation, no state.
The server publishes its endpoint as ``RUN/floor.endpoint``.

``Floor(run_dir, transport)`` starts it as a child process (killed with the
benchmark, even on failure) and waits until it answers. The client side is
``bench.roundtrip``: the same loop, socket options and requests time the
floor and the server being measured.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

import msgpack
import zmq
import zmq.auth

from protocol import rundir, serving, wire

# What the floor answers when not told: results of the kernel's shape and size (i686, 256 MiB), by call.
REPLIES: dict[str, dict[str, Any]] = {
    "map": {"pid": 1, "pages": 1, "tables_allocated": 0, "kernel_free": 7878, "kernel_reserved": 14},
    "unmap": {"pid": 1, "pages": 1, "frames": [[5000, 1]], "tables_freed": 0, "kernel_free": 7878,
              "kernel_reserved": 14},
    "ping": {"pid": None},
}
DEFAULT_CALL = "unmap"  # the reply of a call the table lacks
REPLIES_FILE = "floor.replies"
TURN = 0.1  # seconds a turn of the loop waits at most (as the kernel's, between its housekeeping)


def echo(replies: dict[str, dict[str, Any]]) -> serving.Handler:
    """The floor's handler: decode the request as the servers do, answer the call's result."""
    decode, ok_reply = wire.decode_request, wire.Replies().ok
    default = replies.get(DEFAULT_CALL) or REPLIES[DEFAULT_CALL]

    def handle(identity: str | None, data: bytes) -> bytes:
        req = decode(data)
        return ok_reply(req["id"], replies.get(req["call"], default))

    return handle


def load_replies(run_dir: str) -> dict[str, dict[str, Any]]:
    try:
        with open(os.path.join(run_dir, REPLIES_FILE), "rb") as f:
            return {**REPLIES, **msgpack.unpackb(f.read(), raw=False, strict_map_key=False)}
    except FileNotFoundError:
        return dict(REPLIES)


def serve(bind: str, run_dir: str, server: str = "kernel") -> None:
    ctx = zmq.Context()
    ctx.linger = 0
    pub, sec = rundir.load_keypair(run_dir, server)
    sock, auth, endpoint = serving.bind_router(ctx, bind, pub, sec, "floor")  # the servers' very socket set-up
    loop = serving.Loop(sock, echo(load_replies(run_dir)))  # the servers' very socket loop
    rundir.write_endpoint(run_dir, "floor", endpoint)
    print("ready", flush=True)
    clock = time.monotonic
    try:
        while True:
            loop.turn(clock() + TURN)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(0)
        auth.stop()
        ctx.term()


def remove_ipc_dir(run_dir: str) -> None:
    """Remove the ipc socket directory of ``run_dir`` (under /tmp), once its servers have stopped."""
    rundir.remove_ipc_dir(run_dir)


def bind_for(run_dir: str, transport: str) -> str:
    if transport == "tcp":
        return "tcp://127.0.0.1:*"
    return rundir.default_bind(run_dir, "floor")


class Floor:
    """The floor echo as a child process of this one (``with Floor(run_dir, "ipc") as f: f.endpoint``)."""

    def __init__(self, run_dir: str, transport: str = "ipc", timeout: float = 20.0,
                 replies: dict[str, dict[str, Any]] | None = None) -> None:
        from mmsim.system import _die_with_parent  # the children of a benchmark die with it

        self.run_dir = os.path.abspath(run_dir)
        rundir.init(self.run_dir, clients=0)
        path = os.path.join(self.run_dir, "floor.endpoint")
        if os.path.exists(path):
            os.remove(path)
        path = os.path.join(self.run_dir, REPLIES_FILE)
        if replies is not None:
            with open(path, "wb") as f:
                f.write(msgpack.packb(replies, use_bin_type=True))
        elif os.path.exists(path):
            os.remove(path)
        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        self.log_path = os.path.join(self.run_dir, "logs", "floor.log")
        with open(self.log_path, "ab", buffering=0) as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.floor", "--bind", bind_for(self.run_dir, transport),
                 "--run-dir", self.run_dir],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_die_with_parent, close_fds=True)
        try:
            self.endpoint = self._wait(timeout)
        except BaseException:
            self.close()
            raise
        self.server_key = rundir.public_key(self.run_dir, "kernel")

    def _wait(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the floor echo exited with status {self.proc.returncode}: {self._tail()}")
            try:
                endpoint = rundir.read_endpoint(self.run_dir, "floor")
            except FileNotFoundError:
                time.sleep(0.02)
                continue
            if self._answers(endpoint, max(0.1, deadline - time.monotonic())):
                return endpoint
        raise RuntimeError(f"the floor echo did not start within {timeout:g}s: {self._tail()}")

    def _answers(self, endpoint: str, timeout: float) -> bool:
        ctx = zmq.Context()
        ctx.linger = 0
        s = ctx.socket(zmq.DEALER)
        try:
            s.curve_serverkey = rundir.public_key(self.run_dir, "kernel")
            s.curve_publickey, s.curve_secretkey = rundir.fresh_keypair()
            s.connect(endpoint)
            s.send(wire.request(0, "ping"))
            return bool(s.poll(timeout * 1000, zmq.POLLIN))
        finally:
            s.close(0)
            ctx.term()

    def _tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-10:])
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        remove_ipc_dir(self.run_dir)

    def __enter__(self) -> "Floor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.floor", description="The benchmarks' floor: a bare "
                                 "CURVE ROUTER msgpack echo with the kernel's key pair.")
    ap.add_argument("--bind", required=True, help="ipc://PATH or tcp://HOST:PORT (port * for any)")
    ap.add_argument("--run-dir", required=True, help="run directory with keys/ (the kernel's key pair)")
    ap.add_argument("--server", default="kernel", help="whose key pair to serve with (default: kernel)")
    a = ap.parse_args(argv)
    serve(a.bind, a.run_dir, a.server)


if __name__ == "__main__":
    main()
