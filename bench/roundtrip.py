"""The round-trip loop every benchmark times with, so the floor and the measured server share one client.

``dealer(...)`` opens a CURVE DEALER the way ``protocol.connection`` does
(with a receive timeout, so a dead server fails the benchmark instead of
hanging it). ``run(sock, make, seconds, window)`` keeps ``window`` requests in
flight for ``seconds``: request ``i`` is ``make(i)`` (bytes; ids must be
``base + i`` so replies can be checked in order), every reply is decoded and
must be ``ok`` with the expected id. It returns a ``Sample``: calls answered,
the time they took, and (window 1 only) each call's latency, by call name.

``alternate(rounds, sides)`` runs the floor and the measured things in turn,
a round each, so a noisy neighbour slows both sides alike. A figure is a
ratio taken round by round (the measured side against the floor timed right
next to it) and reported as the median of those per-round ratios with their
spread (``Spread``: median, min..max); comparing one side's best round with
the other's lets a lucky round on one side decide the figure. ``Rounds``
keeps every round for the JSON report.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import msgpack
import zmq

from protocol import rundir, wire

RECV_TIMEOUT_MS = 10_000


class BenchError(RuntimeError):
    """A benchmark could not run as planned (a refused call, a server that stopped answering)."""


def dealer(ctx: zmq.Context, endpoint: str, server_key: bytes, run_dir: str, name: str) -> zmq.Socket:
    """A CURVE DEALER to ``endpoint`` with key pair ``name`` of ``run_dir``."""
    pub, sec = rundir.load_keypair(run_dir, name)
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.curve_serverkey = server_key
    s.curve_publickey = pub
    s.curve_secretkey = sec
    s.setsockopt(zmq.MAXMSGSIZE, wire.MAX_REPLY_BYTES)
    s.rcvtimeo = RECV_TIMEOUT_MS
    s.connect(endpoint)
    return s


def _recv(sock: zmq.Socket) -> dict[str, Any]:
    try:
        data = sock.recv()
    except zmq.Again:
        raise BenchError(f"no reply within {RECV_TIMEOUT_MS / 1000:g}s from "
                         f"{sock.getsockopt_string(zmq.LAST_ENDPOINT)}") from None
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Requests:
    """``make(i)``: request ``i`` of a repeating cycle of (call, args), with id ``base + i``."""

    def __init__(self, cycle: Sequence[tuple[str, dict[str, Any]]], base: int) -> None:
        if not cycle:
            raise ValueError("a request cycle needs at least one call")
        self.cycle = list(cycle)
        self.base = base

    def __call__(self, i: int) -> bytes:
        name, args = self.cycle[i % len(self.cycle)]
        return wire.request(self.base + i, name, args)

    def name(self, i: int) -> str:
        return self.cycle[i % len(self.cycle)][0]


def cpu_seconds(pids: Sequence[int]) -> float | None:
    """CPU time used so far by every thread of processes ``pids`` (Linux schedstat, ns resolution);
    None where it cannot be read. CPU time is what a server spends per call whatever the neighbours do."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return None
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that just ended
    return total / 1e9


@dataclass
class Sample:
    calls: int
    seconds: float
    window: int
    latencies: dict[str, list[float]] = field(default_factory=dict)  # call name -> seconds (window 1)
    server_cpu: float | None = None  # CPU seconds the server process(es) used during the run

    @property
    def cpu_per_call(self) -> float | None:
        return self.server_cpu / self.calls if self.server_cpu is not None and self.calls else None

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def latency(self, name: str | None = None) -> float:
        """Median latency of call ``name`` (of all calls if None), in seconds."""
        if name is None:
            values = [v for vs in self.latencies.values() for v in vs]
        else:
            values = self.latencies.get(name, [])
        if not values:
            return 1.0 / self.rate if self.rate else float("inf")
        return statistics.median(values)


def run(sock: zmq.Socket, make: Requests, seconds: float, window: int = 1, max_calls: int | None = None) -> Sample:
    """Keep ``window`` requests in flight for ``seconds`` (or ``max_calls`` replies); check every reply.

    Only whole cycles are sent (a map is always followed by its unmap), so the run may overshoot
    ``seconds`` by one cycle and ``max_calls`` by less than a cycle."""
    if window < 1:
        raise ValueError("window must be at least 1")
    send, recv, unpackb = sock.send, sock.recv, msgpack.unpackb
    clock = time.perf_counter
    base = make.base
    cycle = len(make.cycle)
    lat: dict[str, list[float]] = {}
    sent_at: list[float] = []
    limit = max_calls if max_calls is not None else 1 << 62
    first = min(window, limit)
    t0 = clock()
    for i in range(first):
        sent_at.append(clock())
        send(make(i))
    sent, done = first, 0
    end = t0 + seconds
    try:
        while done < sent:
            data = recv()
            now = clock()
            reply = unpackb(data, raw=False, strict_map_key=False)
            if reply.get("ok") is not True or reply.get("id") != base + done:
                raise BenchError(f"request {make.name(done)} #{done} got {reply!r}")
            if window == 1:
                lat.setdefault(make.name(done), []).append(now - sent_at[done])
            done += 1
            if sent % cycle or (now < end and sent < limit):  # whole cycles only: map is followed by its unmap
                if window == 1:
                    sent_at.append(clock())
                send(make(sent))
                sent += 1
    except zmq.Again:
        raise BenchError(f"no reply within {RECV_TIMEOUT_MS / 1000:g}s "
                         f"({done} of {sent} answered)") from None
    return Sample(done, clock() - t0, window, lat)


class Stream:
    """One DEALER and its request ids (never reused: a server's replay cache would answer a reused id
    without running the call, and the benchmark would time the cache)."""

    def __init__(self, sock: zmq.Socket, server_pids: Sequence[int] = ()) -> None:
        self.sock = sock
        self.server_pids = list(server_pids)  # whose CPU time a run also measures
        self.next_id = time.time_ns() // 1000

    def call(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request and its reply's result (set-up steps); ``BenchError`` if refused."""
        rid = self.next_id
        self.next_id += 1
        self.sock.send(wire.request(rid, name, args))
        reply = _recv(self.sock)
        if reply.get("id") != rid or reply.get("ok") is not True:
            raise BenchError(f"{name} {args!r} was refused: {reply.get('error')!r}")
        return reply.get("result") or {}

    def run(self, cycle: Sequence[tuple[str, dict[str, Any]]], seconds: float, window: int = 1,
            max_calls: int | None = None) -> Sample:
        make = Requests(cycle, self.next_id)
        self.next_id += 1 << 40  # past every id this run may send, even if it fails half-way
        cpu0 = cpu_seconds(self.server_pids) if self.server_pids else None
        sample = run(self.sock, make, seconds, window, max_calls)
        cpu1 = cpu_seconds(self.server_pids) if cpu0 is not None else None
        if cpu0 is not None and cpu1 is not None:
            sample.server_cpu = cpu1 - cpu0
        self.next_id = make.base + sample.calls  # every request sent was answered
        return sample

    def close(self) -> None:
        self.sock.close(0)


@dataclass(frozen=True)
class Spread:
    """Per-round values of a figure: their median and their range."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        xs = [v for v in values if v is not None and v == v]  # (drops None and NaN)
        if not xs:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(statistics.median(xs), min(xs), max(xs), len(xs))

    def to_json(self, digits: int = 3) -> dict[str, Any]:
        return {"median": round(self.median, digits), "min": round(self.lo, digits), "max": round(self.hi, digits),
                "rounds": self.n}


def per_round(a: "Rounds", b: "Rounds", fn: Callable[[Sample, Sample], float | None]) -> Spread:
    """``fn(a's round r, b's round r)`` for every round both sides ran (they ran next to each other)."""
    return Spread.of([fn(x, y) for x, y in zip(a.samples, b.samples)])


def rate_ratio(measured: "Rounds", floor: "Rounds") -> Spread:
    """Per-round rate of ``measured`` over the floor's rate in the same round."""
    return per_round(measured, floor, lambda m, f: m.rate / f.rate if f.rate else None)


def cpu_ratio(measured: "Rounds", floor: "Rounds") -> Spread:
    """Per-round floor server CPU per echo over ``measured``'s server CPU per call (higher is better, like a
    rate ratio)."""
    return per_round(measured, floor, lambda m, f: (f.cpu_per_call / m.cpu_per_call
                                                    if m.cpu_per_call and f.cpu_per_call else None))


@dataclass
class Rounds:
    """All rounds of one side; ``best`` is the round with the highest rate."""

    samples: list[Sample] = field(default_factory=list)

    @property
    def rate(self) -> Spread:
        """Calls per second, per round."""
        return Spread.of([s.rate for s in self.samples])

    @property
    def cpu(self) -> Spread:
        """Server CPU seconds per call, per round (n == 0 if not measured)."""
        return Spread.of([s.cpu_per_call for s in self.samples])

    def latency(self, name: str | None = None) -> Spread:
        """The median latency of ``name`` (seconds), per round."""
        return Spread.of([s.latency(name) for s in self.samples])

    @property
    def best(self) -> Sample:
        return max(self.samples, key=lambda s: s.rate)

    def best_latency(self, name: str | None = None) -> float:
        """The smallest per-round median latency of ``name``."""
        return min(s.latency(name) for s in self.samples)

    @property
    def cpu_per_call(self) -> float | None:
        """The smallest per-round server CPU time per call (None if not measured)."""
        xs = [s.cpu_per_call for s in self.samples if s.cpu_per_call is not None]
        return min(xs) if xs else None

    def to_json(self) -> dict[str, Any]:
        out = {"rates": [round(s.rate, 1) for s in self.samples], "best_rate": round(self.best.rate, 1),
               "median_rate": round(statistics.median(s.rate for s in self.samples), 1),
               "calls": [s.calls for s in self.samples]}
        cpu = self.cpu_per_call
        if cpu is not None:
            out["server_cpu_us_per_call"] = round(cpu * 1e6, 2)  # (the least of the rounds)
            out["server_cpu_us_per_call_rounds"] = [round(s.cpu_per_call * 1e6, 2) if s.cpu_per_call else None
                                                    for s in self.samples]
        return out


def alternate(rounds: int, sides: dict[str, Callable[[], Sample]],
              tick: Callable[[str], None] | None = None) -> dict[str, Rounds]:
    """Run each side once per round, in turn; every side's rounds."""
    out = {name: Rounds() for name in sides}
    for r in range(rounds):
        for name, fn in sides.items():
            if tick is not None:
                tick(f"{name} (round {r + 1}/{rounds})")
            out[name].samples.append(fn())
    return out
