"""The honest client: a workload within its quotas, timed call by call, in a process of its own.

The victim of the resource attacks (``clients.isolation``, ``mmsim client
attack``, ``mmsim bench isolation``): it holds a few pages, and goes round a
cycle of ordinary calls (a one-page alloc and free, a burst alloc and free,
a thread, an endpoint, a ping), and now and then it looks at its own usage
(kernel and mm ``stats``: anything mapped in its address space that it did
not map itself is counted as ``extra_pages``). A keepalive thread renews its
lease. Every call's latency and outcome is recorded. An alloc or free
answered EIO (its outcome is not known yet) is sent again, same id, until
it gets a real answer, as the design tells a client to do: the error is
counted, and the client still knows what it holds.

It is driven over its standard input, one line per command, and answers
each with one JSON line on standard output:

- ``mark``: a summary of the window since the previous mark (calls, seconds,
  rate, p50/p99/max latency, errors by name and the first one, the pids it
  saw, the most foreign pages and mappings it saw), and a new window starts;
- ``quit``: the last window's summary, then it frees what it holds and exits.

Its first line is ``{"ready": true, "pid": ..., "identity": ..., "quota": ...}``
once it holds its pages, or ``{"ready": false, "error": ...}``.

Run as ``python -m clients.honest --run-dir RUN --name NAME`` (the key pair
``NAME`` must be admitted). ``HonestProcess`` starts and drives one.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable

from protocol import PROT_READ, PROT_WRITE
from protocol.errors import CallError, Errno

RW = PROT_READ | PROT_WRITE
HOLD_VA = 0x2000_0000  # the pages it holds all along
ONE_VA = 0x2100_0000  # the one-page alloc/free
BURST_VA = 0x2200_0000  # the burst alloc/free
LOOK_EVERY = 8  # cycles between looks at its own usage
SETTLE_TRIES = 20  # resends of an mm call answered EIO (its outcome not known yet), SETTLE_PAUSE apart
SETTLE_PAUSE = 0.25


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values (nearest rank); 0.0 if there are none."""
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


class Window:
    """What the honest client saw since the last mark."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.lat: list[float] = []
        self.by_call: dict[str, list[float]] = {}
        self.errors: Counter = Counter()
        self.first_error = ""
        self.pids: set[Any] = set()
        self.extra_pages = 0
        self.extra_mappings = 0
        self.offers_to_me = 0

    def summary(self) -> dict[str, Any]:
        secs = max(1e-9, time.monotonic() - self.t0)
        lat = sorted(self.lat)
        return {"began": round(self.t0, 4), "calls": len(lat), "seconds": round(secs, 4),
                "rate": round(len(lat) / secs, 2),
                "p50_ms": round(percentile(lat, 0.5) * 1e3, 4), "p99_ms": round(percentile(lat, 0.99) * 1e3, 4),
                "max_ms": round((lat[-1] if lat else 0.0) * 1e3, 4), "errors": dict(self.errors),
                "first_error": self.first_error, "pids": sorted(self.pids, key=str),
                "extra_pages": self.extra_pages, "extra_mappings": self.extra_mappings,
                "offers_to_me": self.offers_to_me,
                "p99_ms_by_call": {k: round(percentile(sorted(v), 0.99) * 1e3, 4)
                                   for k, v in sorted(self.by_call.items())}}


class Honest:
    """The workload loop (in the honest process)."""

    def __init__(self, client: Any, hold: int, burst: int) -> None:
        self.c = client
        self.hold, self.burst = hold, burst
        self.win = Window()
        self.lock = threading.Lock()
        self.mine_pages = 0  # pages the mm mapped for it right now
        self.mine_maps = 0

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            out = fn()
        except CallError as exc:
            out = exc
        took = time.perf_counter() - t0
        with self.lock:
            self.win.lat.append(took)
            self.win.by_call.setdefault(name, []).append(took)
            if isinstance(out, CallError):
                self.win.errors[out.code.name] += 1
                if not self.win.first_error:
                    self.win.first_error = f"{name}: {out}"[:300]
        return out

    def mark(self) -> dict[str, Any]:
        with self.lock:
            win, self.win = self.win, Window()
        return win.summary()

    def start(self) -> dict[str, Any]:
        self.c.alloc(self.hold, RW, vaddr=HOLD_VA)
        self.mine_pages, self.mine_maps = self.hold, 1
        hello = self.c.hello()
        mm = self.c.mm_stats().get("you") or {}
        return {"ready": True, "pid": hello.get("pid"), "identity": self.c.identity, "quota": mm.get("quota"),
                "kernel_quota": mm.get("kernel_quota"), "hold": self.hold, "burst": self.burst}

    def settled(self, name: str, call: str, args: dict[str, Any]) -> Any:
        """An mm call whose EIO is settled as the design says: the same request (same id) is sent again
        until it gets a real answer (an EIO means the outcome is not known yet: an allocation may have
        been made, a free done). Every EIO is still counted as an error of the window."""
        mm = self.c.mm
        rid = mm.new_id()
        out = self.timed(name, lambda: mm.call(call, args, req_id=rid))
        for _ in range(SETTLE_TRIES):
            if not (isinstance(out, CallError) and out.code == Errno.EIO):
                break
            time.sleep(SETTLE_PAUSE)
            out = self.timed(name, lambda: mm.call(call, args, req_id=rid))
        return out

    def cycle(self, n: int) -> None:
        c = self.c
        got = self.settled("alloc", "alloc", {"pages": 1, "prot": RW, "vaddr": ONE_VA})
        if not isinstance(got, CallError):
            self.mine_pages += 1
            self.mine_maps += 1
            if n % LOOK_EVERY == 0:
                self.look()
            if not isinstance(self.settled("free", "free", {"vaddr": ONE_VA, "pages": 1}), CallError):
                self.mine_pages -= 1
                self.mine_maps -= 1
        tid = self.timed("thread_create", c.thread_create)
        if not isinstance(tid, CallError):
            self.timed("thread_destroy", lambda: c.thread_destroy(tid))
        eid = self.timed("endpoint_create", c.endpoint_create)
        if not isinstance(eid, CallError):
            self.timed("endpoint_destroy", lambda: c.endpoint_destroy(eid))
        got = self.settled("alloc burst", "alloc", {"pages": self.burst, "prot": RW, "vaddr": BURST_VA})
        if not isinstance(got, CallError):
            self.mine_pages += self.burst
            self.mine_maps += 1
            if not isinstance(self.settled("free burst", "free", {"vaddr": BURST_VA, "pages": self.burst}),
                              CallError):
                self.mine_pages -= self.burst
                self.mine_maps -= 1
        ping = self.timed("ping", c.ping)
        if isinstance(ping, dict):
            with self.lock:
                self.win.pids.add(ping.get("pid"))
        elif isinstance(ping, CallError):
            with self.lock:
                self.win.pids.add(f"ping: {ping.code.name}")

    def look(self) -> None:
        """Its own usage: anything mapped that it did not map is foreign."""
        st = self.timed("stats", self.c.stats)
        mm = self.timed("mm stats", self.c.mm_stats)
        with self.lock:
            if isinstance(st, dict) and isinstance(st.get("you"), dict):
                self.win.extra_pages = max(self.win.extra_pages, int(st["you"].get("pages", 0)) - self.mine_pages)
                self.win.pids.add(st["you"].get("pid"))
            if isinstance(mm, dict) and isinstance(mm.get("you"), dict):
                you = mm["you"]
                self.win.extra_mappings = max(self.win.extra_mappings, int(you.get("mappings", 0)) - self.mine_maps)
                self.win.offers_to_me = max(self.win.offers_to_me, len((you.get("offers") or {}).get("to_you", [])))

    def finish(self) -> None:
        try:
            self.c.free(HOLD_VA, self.hold)
        except CallError:
            pass


def main(argv: list[str] | None = None) -> int:
    from clients.client import Client

    ap = argparse.ArgumentParser(description="The honest client (driven by 'mark'/'quit' lines on stdin).")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--hold", type=int, default=8, help="pages held all along")
    ap.add_argument("--burst", type=int, default=16, help="pages of the burst alloc/free")
    ap.add_argument("--timeout", type=float, default=2.0)
    a = ap.parse_args(argv)
    commands: list[str] = []
    cond = threading.Condition()

    def read() -> None:
        for line in sys.stdin:
            with cond:
                commands.append(line.strip())
                cond.notify()
        with cond:
            commands.append("quit")
            cond.notify()

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    try:
        client = Client.from_run_dir(a.run_dir, a.name, create_key=False, timeout=a.timeout, retries=2)
        h = Honest(client, a.hold, a.burst)
        client.start_keepalive()
        say(h.start())
    except (CallError, OSError, ValueError) as exc:
        say({"ready": False, "error": str(exc)[:500]})
        return 3
    threading.Thread(target=read, name="commands", daemon=True).start()
    n = 0
    try:
        while True:
            with cond:
                todo, commands[:] = list(commands), []
            for cmd in todo:
                if cmd == "mark":
                    say(h.mark())
                elif cmd == "quit":
                    say(h.mark())
                    return 0
            h.cycle(n)
            n += 1
    finally:
        h.finish()
        client.close()


class HonestProcess:
    """Starts ``python -m clients.honest`` and drives it (``mark``, ``stop``)."""

    def __init__(self, run_dir: str, name: str, hold: int = 8, burst: int = 16, timeout: float = 2.0,
                 start_wait: float = 30.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "clients.honest", "--run-dir", run_dir, "--name", name,
                                      "--hold", str(hold), "--burst", str(burst), "--timeout", str(timeout)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, text=True, bufsize=1)
        ready = self._line(start_wait)
        if ready is None or not ready.get("ready"):
            err = ready.get("error") if ready else self._stderr()
            self.kill()
            raise RuntimeError(f"the honest client did not start: {err}")
        self.info = ready
        self.pid = ready["pid"]
        self.identity = ready["identity"]

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "no answer"
        return (self.proc.stderr.read() if self.proc.stderr else "")[-2000:]

    def _line(self, timeout: float) -> dict[str, Any] | None:
        out = self.proc.stdout
        assert out is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([out], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            line = out.readline()
            if not line:
                return None
            try:
                return json.loads(line)
            except ValueError:
                continue
        return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def mark(self, timeout: float = 15.0) -> dict[str, Any]:
        """The summary of the window that ends now (a new one starts)."""
        if not self.alive():
            raise RuntimeError(f"the honest client exited ({self.proc.returncode}): {self._stderr()}")
        assert self.proc.stdin is not None
        self.proc.stdin.write("mark\n")
        self.proc.stdin.flush()
        got = self._line(timeout)
        if got is None:
            raise RuntimeError("the honest client did not answer a mark")
        return got

    def window(self, seconds: float) -> dict[str, Any]:
        """A fresh window of ``seconds``: its summary."""
        self.mark()
        time.sleep(seconds)
        return self.mark()

    def stop(self, timeout: float = 10.0) -> dict[str, Any] | None:
        last = None
        if self.alive():
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                last = self._line(timeout)
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        return last

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
