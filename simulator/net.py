"""The simulated message layer: every message between simulated processes goes through here.

A message carries the sender's identity (what CURVE would authenticate), the
exact request or reply bytes of the real wire protocol, and the name of the
call (for statistics and traces only). ``send`` either loses it, or
schedules its delivery after a latency; a seeded fault may delay it further
or deliver it twice. A partition loses every message between the mm and the
kernel for a while (replies to requests the kernel did execute included);
``reply_loss`` loses kernel replies to the mm after the kernel executed the
call; ``jitter`` gives that share of mm-kernel messages a latency up to
``jitter_range`` (so the mm's requests in flight, and their replies, arrive
out of order). ``heal`` ends every fault: from then on messages arrive, in a
normal time. Randomness comes only from the ``Random`` given (one child of
the seed), so the same seed gives the same losses, duplicates and delays.

Transport assumption: a message is delivered within ``NetPlan.max_delay``
of being sent, or never. The mm waits at least that long after its last
resend before it gives up, and a restarted mm comes back later than that, so
no request of the mm is executed after the mm decided it got no answer or
after its successor reconciled with the kernel. (Nothing in the protocol
fences such a "zombie" request; on ZeroMQ it would need a kernel stalled
for longer than the mm's whole Lazy Pirate window.)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from simulator.clock import Clock


@dataclass(frozen=True)
class NetPlan:
    """Fault rates of the message layer (per message) and its latencies (microseconds)."""

    loss: float = 0.0
    dup: float = 0.0
    delay: float = 0.0
    reply_loss: float = 0.0  # kernel replies to the mm lost (after the kernel executed the call)
    jitter: float = 0.0  # mm-kernel messages given a latency from ``jitter_range`` instead
    latency: tuple[int, int] = (100, 800)
    jitter_range: tuple[int, int] = (100, 4_000)
    delay_range: tuple[int, int] = (2_000, 20_000)  # kept below the Lazy Pirate windows (see faults.py)

    @property
    def max_delay(self) -> int:
        """The longest a message can take (a duplicate counts from its original's send)."""
        hi = max(self.latency[1], self.jitter_range[1] if self.jitter else 0)
        return hi + self.delay_range[1] + 4 * hi


class Msg:
    """One message in flight. ``dst``/``src`` are endpoint names; ``call`` the request's call name."""

    __slots__ = ("call", "data", "dst", "identity", "reply", "src")

    def __init__(self, dst: Any, src: Any, identity: str, data: bytes, reply: bool, call: str = "") -> None:
        self.dst = dst
        self.src = src
        self.identity = identity
        self.data = data
        self.reply = reply
        self.call = call


class Net:
    def __init__(self, clock: Clock, rng: random.Random, plan: NetPlan,
                 on_fault: Callable[[str, Msg], None], deliver: Callable[[Msg], None]) -> None:
        self.clock = clock
        self.deliver = deliver  # called with each message as it arrives
        self.rng = rng
        self.plan = plan
        self.on_fault = on_fault
        self.in_flight = 0
        self.sent = 0
        self.partition_until = 0  # until then every message between the mm and the kernel is lost

    def partition(self, until: int) -> None:
        """Cut the mm off from the kernel (both ways) until ``until``: a stalled kernel, a broken link."""
        self.partition_until = max(self.partition_until, until)

    def heal(self) -> None:
        """No more faults: every message arrives, in a normal time (what is in flight still arrives)."""
        self.plan = NetPlan(latency=self.plan.latency)
        self.partition_until = 0

    def send(self, msg: Msg) -> None:
        p, rng = self.plan, self.rng
        self.sent += 1
        a, b = msg.dst[0], msg.src[0]
        mk = (a == "mm" and b == "kernel") or (a == "kernel" and b == "mm")  # between the mm and the kernel
        if mk and self.clock.now < self.partition_until:
            self.on_fault("partitioned", msg)
            return
        if p.loss and rng.random() < p.loss:
            self.on_fault("lost", msg)
            return
        if p.reply_loss and msg.reply and mk and b == "kernel" and rng.random() < p.reply_loss:
            self.on_fault("reply_lost", msg)
            return
        lo, hi = p.jitter_range if p.jitter and mk and rng.random() < p.jitter else p.latency
        below = rng._randbelow  # (``randrange(lo, hi + 1)`` is ``lo + _randbelow(hi + 1 - lo)``: the same numbers)
        delay = lo + below(hi + 1 - lo)
        if p.delay and rng.random() < p.delay:
            d0, d1 = p.delay_range
            delay += d0 + below(d1 + 1 - d0)
            self.on_fault("delayed", msg)
        self.in_flight += 1
        self.clock.after(delay, self.deliver, msg)
        if p.dup and rng.random() < p.dup:
            self.on_fault("duplicated", msg)
            self.in_flight += 1
            self.clock.after(delay + lo + below(4 * hi + 1 - lo), self.deliver, msg)

    def delivered(self) -> None:
        self.in_flight -= 1
