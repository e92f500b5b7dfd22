"""The workload client process (``mmsim client run``) against a real kernel and mm, and against a liar.

Each workload runs as its own OS process for about two seconds and must exit 0
with a JSON summary showing the calls it is meant to make; afterwards the mm's
view and the kernel's agree (audit: 0 divergences). The runner survives the mm
being killed and restarted under it, stops cleanly on SIGTERM, and exits 1
when a server's answer is visibly wrong (a fake server that lies about frames).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import pytest
import zmq
import zmq.auth
from typer.testing import CliRunner
from zmq.auth.thread import ThreadAuthenticator

from mmsim.cli import app
from clients.runner import Bounds, check_reply
from mmsim.system import System
from clients.workloads import Req
from kernel_server.arch import get_profile
from kernel_server.bootmap import pc_map
from protocol import rundir, wire
from protocol.errors import Errno, Error
from support import wait_for

LEASE = 1.0


def summary_of(log_path: str) -> dict[str, Any]:
    """The last JSON line a ``--json`` client wrote to its log."""
    with open(log_path, errors="replace") as f:
        for line in reversed(f.readlines()):
            if line.startswith("{"):
                return json.loads(line)
    raise AssertionError(f"no JSON summary in {log_path}:\n{open(log_path).read()[-2000:]}")




def kstats(s: System) -> dict[str, Any]:
    """The kernel's stats with its per-process listing (the operator's)."""
    with s.connection("kernel", identity="operator") as conn:
        return conn.call("stats", {"from_pid": 0})


@pytest.fixture(scope="module")
def system():
    run_dir = tempfile.mkdtemp(prefix="mmt-", dir="/tmp")
    s = System(run_dir, lease=LEASE, clients=0)
    rundir.admit(run_dir, "observer")  # (the System's readiness pings: only admitted keys get in)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def calls_ok(summ: dict[str, Any], call: str) -> int:
    return summ["calls"].get(call, {}).get("ok", 0)


def test_each_workload_runs_as_a_process_and_the_views_agree_after(system: System) -> None:
    workloads = ("steady", "sparse", "kobjects", "sharer")
    parts = {w: system.start_client(f"w-{w}", w, seed=7, duration=2.0, extra=["--json", "--progress", "0.5"])
             for w in workloads}
    kobj_key = rundir.public_key(system.run_dir, "w-kobjects").decode()
    shared_seen = 0  # kernel stats that prove a frame had a reference count above 1
    while any(p.alive() for p in parts.values()):
        st = kstats(system)
        # every mapping counts one reference on each frame it covers; more references than mapped
        # user frames means some frame is mapped twice (kobjects' read-only maps are of kernel frames)
        refs = sum(p["pages"] + p["large_pages"] * 1024 for p in st["per_process"] if p["key"] != kobj_key)
        shared_seen += refs > st["user_mapped"]
        time.sleep(0.05)
    summ = {}
    for w, p in parts.items():
        assert p.proc.wait(10) == 0, p.log_tail()
        summ[w] = summary_of(p.log_path)
        assert summ[w]["wrong"] == 0 and summ[w]["stopped"] == "duration" and summ[w]["exit"] == 0
    s = summ["steady"]
    assert calls_ok(s, "alloc") > 10 and calls_ok(s, "free") > 10
    s = summ["sparse"]
    assert calls_ok(s, "alloc") > 10
    assert s["peak"]["tables"] > 1  # one page per 4 MiB span: the kernel allocated page tables for them
    s = summ["kobjects"]
    for call in ("thread_create", "thread_destroy", "endpoint_create", "endpoint_destroy", "map", "unmap"):
        assert calls_ok(s, call) > 0, call
    assert s["peak"]["threads"] >= 1 and s["peak"]["endpoints"] >= 1
    s = summ["sharer"]
    assert calls_ok(s, "share") > 0 and calls_ok(s, "accept") > 0 and calls_ok(s, "free") > 0
    assert s["peer"] and s["peer_peak"].get("pages", 0) > 1  # the peer maps the offers it accepted
    assert shared_seen > 0
    report = system.wait_quiet(timeout=15)
    assert kstats(system)["processes"] == 0
    assert report["divergences"] == 0 and report["i13_problems"] == 0, report


def test_runner_survives_the_mm_being_killed_and_restarted(system: System) -> None:
    part = system.start_client("survivor", "steady", seed=3, duration=4.0,
                               extra=["--json", "--progress", "0.1", "--timeout", "0.3", "--retries", "1"])
    key = rundir.public_key(system.run_dir, "survivor").decode()
    wait_for(lambda: any(p["key"] == key and p["pages"] for p in kstats(system)["per_process"]), 10,
             "the client's first allocation")
    system.kill("mm", signal.SIGKILL)
    line = wait_for(lambda: next((ln for ln in reversed(part.log_tail(5).splitlines()) if "EIO" in ln), None), 10,
                    "the client to notice the mm is gone")
    ok_while_down = int(re.search(r", ok (\d+)", line).group(1))
    system.start_mm()
    assert part.proc.wait(20) == 0, part.log_tail()
    s = summary_of(part.log_path)
    assert s["errors"].get("EIO", 0) >= 1 and s["wrong"] == 0
    assert s["ok"] > ok_while_down + 10  # it carried on with the new mm
    report = system.wait_quiet(timeout=15)
    assert report["divergences"] == 0, report


def test_runner_outlives_a_pause_longer_than_its_lease_and_stops_on_sigterm(system: System) -> None:
    part = system.start_client("stopper", "kobjects", seed=5, duration=60.0, extra=["--json", "--progress", "0"])
    key = rundir.public_key(system.run_dir, "stopper").decode()

    def pid() -> int | None:
        return next((p["pid"] for p in kstats(system)["per_process"] if p["key"] == key), None)

    first = wait_for(pid, 10, "the client's process")
    system.send_signal("stopper", signal.SIGSTOP)
    try:
        wait_for(lambda: pid() is None, 10, "the lease of the paused client to run out")
    finally:
        system.send_signal("stopper", signal.SIGCONT)
    second = wait_for(pid, 10, "the resumed client to get a new process")
    assert second != first

    def acted_in_new_process() -> bool:  # kernel objects come only after the alloc's reply arrived
        p = next((p for p in kstats(system)["per_process"] if p["pid"] == second), None)
        return p is not None and p["threads"] + p["endpoints"] > 0

    wait_for(acted_in_new_process, 10, "the resumed client to use its new process")
    assert system.kill("stopper", signal.SIGTERM) == 0, part.log_tail()
    s = summary_of(part.log_path)
    assert s["stopped"] == "SIGTERM" and s["wrong"] == 0 and s["elapsed"] < 30
    assert s["calls"]["alloc"]["ok"] >= 2  # the workload noticed (ESRCH) and the mm made it a new process
    assert s["errors"].get("ESRCH", 0) >= 1


def flat(text: str) -> str:
    """Output without the error box's borders and line breaks."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


def test_bad_options_exit_2(tmp_path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["client", "run", "--run-dir", str(tmp_path), "--name", "x", "--workload", "nope"])
    assert r.exit_code == 2 and "unknown workload" in flat(r.output)
    r = runner.invoke(app, ["client", "run", "--run-dir", str(tmp_path), "--name", "x", "--workload", "steady"])
    assert r.exit_code == 2 and "not a run directory" in flat(r.output)
    rundir.init(str(tmp_path), clients=0)
    r = runner.invoke(app, ["client", "run", "--run-dir", str(tmp_path), "--name", "bad name", "--workload", "steady"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["client", "run", "--run-dir", str(tmp_path), "--name", "x", "--workload", "steady",
                            "--rate", "0"])
    assert r.exit_code == 2


# ---- wrong answers -------------------------------------------------------------------------------------------

BOUNDS = Bounds(frames=65536, user_top=0xC000_0000, large_frames=1024)


def test_check_reply_accepts_right_answers() -> None:
    req = Req("mm", "alloc", {"pages": 2, "prot": 3})
    assert check_reply(req, {"vaddr": 0x40_0000, "pages": 2, "frames": [[100, 1], [300, 1]]}, BOUNDS) is None
    assert check_reply(req, Error(Errno.ENOMEM, "quota"), BOUNDS) is None
    assert check_reply(req, Error(Errno.EIO, "mm away"), BOUNDS) is None
    big = Req("mm", "alloc", {"pages": 1024, "prot": 3, "large": True})
    assert check_reply(big, {"vaddr": 0x80_0000, "pages": 1024, "frames": [[2048, 1024]]}, BOUNDS) is None
    share = Req("mm", "share", {"vaddr": 0x40_0000, "pages": 2, "peer": "p" * 40, "prot": 1})
    assert check_reply(share, {"offer": 7, "peer": "p" * 40, "pages": 2, "prot": 1}, BOUNDS) is None
    accept = Req("mm", "accept", {"offer": 7})
    assert check_reply(accept, {"offer": 7, "vaddr": 0x6000_0000, "pages": 2, "frames": [[9, 2]], "prot": 1},
                       BOUNDS) is None


@pytest.mark.parametrize("req, result", [
    (Req("mm", "alloc", {"pages": 2, "prot": 3}), {"vaddr": 0x40_0000, "pages": 2, "frames": [[100, 3]]}),
    (Req("mm", "alloc", {"pages": 2, "prot": 3}), {"vaddr": 0x40_0000, "pages": 3, "frames": [[100, 3]]}),
    (Req("mm", "alloc", {"pages": 1, "prot": 3}), {"vaddr": 0x40_0001, "pages": 1, "frames": [[100, 1]]}),
    (Req("mm", "alloc", {"pages": 1, "prot": 3}), {"vaddr": 0xC000_0000, "pages": 1, "frames": [[100, 1]]}),
    (Req("mm", "alloc", {"pages": 1, "prot": 3}), {"vaddr": 0x40_0000, "pages": 1, "frames": [[70000, 1]]}),
    (Req("mm", "alloc", {"pages": 1, "prot": 3, "vaddr": 0x1000_0000}), {"vaddr": 0x40_0000, "pages": 1,
                                                                         "frames": [[5, 1]]}),
    (Req("mm", "alloc", {"pages": 1024, "prot": 3, "large": True}), {"vaddr": 0x80_0000, "pages": 1024,
                                                                      "frames": [[2049, 1024]]}),
    (Req("mm", "alloc", {"pages": 1, "prot": 3}), {"value": 5}),
    (Req("mm", "free", {"vaddr": 0x40_0000, "pages": 2}), {"vaddr": 0x40_0000, "pages": 1, "frames": [[1, 1]]}),
    (Req("mm", "share", {"vaddr": 0x40_0000, "pages": 1, "peer": "p" * 40, "prot": 1}),
     {"offer": 3, "pages": 1, "prot": 1, "peer": "q" * 40}),
    (Req("mm", "share", {"vaddr": 0x40_0000, "pages": 2, "peer": "p" * 40, "prot": 1}),
     {"offer": 3, "pages": 1, "prot": 1, "peer": "p" * 40}),
    (Req("mm", "accept", {"offer": 3}), {"offer": 4, "vaddr": 0x6000_0000, "pages": 1, "frames": [[1, 1]]}),
    (Req("mm", "accept", {"offer": 3}), {"offer": 3, "vaddr": 0x6000_0000, "pages": 2, "frames": [[1, 1]]}),
    (Req("mm", "accept", {"offer": 3, "vaddr": 0x7000_0000}), {"offer": 3, "vaddr": 0x6000_0000, "pages": 1,
                                                                 "frames": [[1, 1]]}),
    (Req("kernel", "thread_create", {}), {"tid": "1"}),
    (Req("kernel", "thread_destroy", {"tid": 4}), {"tid": 5}),
    (Req("kernel", "map", {"vaddr": 0x8000_0000, "frames": [[4096, 1]], "prot": 1}), {"pages": 2}),
    (Req("kernel", "ping", {}), {}),
    (Req("kernel", "ping", {}), Error(Errno.EPROTO, "undecodable")),
    (Req("mm", "alloc", {"pages": 1, "prot": 3}), Error(Errno.ENOSYS, "unknown call")),
])
def test_check_reply_catches_wrong_answers(req: Req, result: Any) -> None:
    assert check_reply(req, result, BOUNDS) is not None


class LyingServers:
    """A fake kernel and mm on real CURVE sockets that answer every request with ``answer(server, call, args,
    identity)`` (a result dict), garbage and all: a server that accepts every lie and tells its own."""

    def __init__(self, run_dir: str, answer: Callable[[str, str, Any, str], dict[str, Any]]) -> None:
        rundir.init(run_dir, clients=0)
        self.answer = answer
        self.ctx = zmq.Context()
        self.ctx.linger = 0
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        self.socks: dict[zmq.Socket, str] = {}
        for server in ("kernel", "mm"):
            s = self.ctx.socket(zmq.ROUTER)
            s.curve_server = True
            s.curve_publickey, s.curve_secretkey = rundir.load_keypair(run_dir, server)
            s.bind(f"ipc://{run_dir}/{server}.sock")
            rundir.write_endpoint(run_dir, server, s.getsockopt_string(zmq.LAST_ENDPOINT))
            self.socks[s] = server
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        while not self.stop.is_set():
            for s, _ in poller.poll(50):
                frames = s.recv_multipart(copy=False)
                try:
                    msg = wire.decode(frames[1].bytes)
                except Exception:
                    msg = None
                msg = msg if isinstance(msg, dict) else {}
                req_id = msg.get("id") if type(msg.get("id")) is int and msg.get("id") >= 0 else None
                args = msg.get("args") if isinstance(msg.get("args"), dict) else {}
                result = self.answer(self.socks[s], str(msg.get("call")), args, frames[1].get("User-Id") or "")
                s.send_multipart([frames[0].bytes, wire.ok_reply(req_id, result)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.socks:
            s.close(0)
        self.auth.stop()
        self.ctx.term()


def plausible(server: str, call: str, args: Any, identity: str) -> dict[str, Any]:
    """Answers that look right to a client that does not check much."""
    if call == "hello":
        return {"v": 1, "arch": "i686", "page_size": 4096, "large_page_sizes": [4 << 20], "user_top": 0xC000_0000,
                "frames": 65536, "identity": identity, "is_mm": True, "pid": 1, "lease_seconds": 5.0}
    if call == "address_map":
        return {"arch": "i686", "frames": 65536, "entries": pc_map(get_profile("i686"), 256 << 20).to_wire()}
    if call == "stats":
        return {"kernel_free": 256, "user_mapped": 0, "processes": 0, "per_process": [], "quota": 100,
                "view": {}, "you": None, "counters": {}}
    return {"pid": 1, "tid": 1, "eid": 1, "vaddr": 0x40_0000, "pages": 1, "frames": [[0, 1]], "peer": ""}


@pytest.fixture
def liar_dir():
    d = tempfile.mkdtemp(prefix="mml-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_runner_exits_1_when_the_mm_lies_about_frames(liar_dir: str) -> None:
    def answer(server: str, call: str, args: Any, identity: str) -> dict[str, Any]:
        if call == "alloc":  # one frame more than the pages asked for
            return {"vaddr": 0x40_0000, "pages": args.get("pages"), "frames": [[4096, args.get("pages", 1) + 1]]}
        return plausible(server, call, args, identity)

    liar = LyingServers(liar_dir, answer)
    try:
        p = subprocess.run([sys.executable, "-m", "mmsim.cli", "client", "run", "--run-dir", liar_dir, "--name", "c",
                            "--workload", "steady", "--duration", "0.5", "--json", "--progress", "0"],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        liar.close()
    assert p.returncode == 1, p.stderr
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert s["wrong"] > 0 and s["exit"] == 1
    assert any("alloc" in w and "frames" in w for w in s["wrong_answers"])
