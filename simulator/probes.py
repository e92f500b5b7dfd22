"""Coverage probes: the declared list of rare paths a run should reach, and how a run's hits are counted.

FoundationDB calls these CODE_PROBEs: a named point in the code that a
simulation run either passed or not. A swarm adds up, per configuration, how
many seeds hit each probe; ``mmsim swarm report`` lists the probes no seed
hit (what the swarm never exercised). "Never hit" means something only
because every name is declared here, in ``PROBES``, and nowhere else.

Two sources, one list:

- **in the cores**: the kernel and the mm call ``observer.probe(name)``
  through their observer seams (``kernel_server.observe``,
  ``mm_service.observe``) at the probe point, only when an observer is set
  (the default path does not even test for it beyond the flag it already
  had). The simulator's nodes are those observers and count the hits
  (``World.probes``).
- **in the simulator**: derived after the run from what the world already
  counts (faults applied and struck, calls by kind and result, lies by
  catalogue name): ``seed_probes`` adds them to the cores' hits.

A name hit that is not declared is a bug of this list (``undeclared``; the
tests check a sweep finds none).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from simulator.faults import AFTER_EXEC, CRASH_POINTS, FAMILIES
from simulator.lies import TOLD_LIES, probe_name

# ---- the cores (observer.probe) ------------------------------------------------------------------------

CORE = {
    "kernel.enomem.quota": "a process's call refused ENOMEM past its own kernel quota",
    "kernel.enomem.pool": "proc_create refused ENOMEM: not enough unreserved frames in the kernel's pool",
    "kernel.donate.empty_pool": "a donation to a kernel pool with no free frame left",
    "kernel.reclaim.count": "a reclaim by count carried out",
    "kernel.reclaim.frames": "a reclaim of named frames carried out",
    "kernel.reclaim.reserved": "a reclaim of named frames refused: they are reserved for processes' quotas",
    "mm.enomem.donate_retry": "the mm donated and retried after the kernel's pool ENOMEM",
    "mm.watermark.donate": "the mm donated to bring the kernel's pool up to its low watermark",
    "mm.watermark.reclaim": "the mm reclaimed from a kernel pool above its high watermark",
    "mm.reclaim_for_alloc": "the mm reclaimed unreserved kernel frames to satisfy an allocation",
    "mm.quota.refused": "a client's alloc or accept refused past its user quota",
    "mm.quota.grant_refused": "a new client's quotas refused: granting them would overcommit",
    "mm.process.adopted": "the mm found the kernel already has a process it had lost track of",
    "mm.offer.accepted": "an offer accepted and mapped into the peer",
    "mm.offer.withdrawn": "an open offer closed because the allocation offered was freed or its client went",
    "mm.recovery.map.done": "recovery settled a pending map as done (the kernel had carried it out)",
    "mm.recovery.map.undone": "recovery settled a pending map as undone",
    "mm.recovery.unmap.done": "recovery settled a pending unmap as done",
    "mm.recovery.unmap.undone": "recovery settled a pending unmap as undone",
    "mm.recovery.neither": "recovery found a range that was neither done nor undone and cleared it",
    "mm.journal.compacted": "the mm wrote a snapshot (journal compaction)",
    "mm.kernel.lost": "the mm lost the kernel (no reply within its resends)",
    "mm.kernel.back": "the mm found the lost kernel back and settled with it",
}

# ---- the simulator (derived after a run) ----------------------------------------------------------------

STEP_FAULT_VARIANTS = {
    "client_death": ("now", "in_request"),
    "mm_crash": CRASH_POINTS,
    "recovery_crash": ("",),
    "partition": ("",),
    "lost_after_exec": AFTER_EXEC,
    "lost_after_shared": ("map_shared", "unmap_shared"),
    "recovery_loss": ("",),
    "lie_client": ("",),
    "lie_mm": ("",),
}
# where an mm crash struck: the words of ``MMNode.crash``'s reasons -> probe
CRASHES = {
    "at a step": "crash.step",
    "as the kernel's reply": "crash.kernel_reply",
    "not committed": "crash.journal",
    "right after a journal commit": "crash.commit",
    "about to send its reply": "crash.client_reply",
    "during recovery": "crash.recovery",
}
NET = ("lost", "duplicated", "delayed", "reply_lost", "partitioned")
SIM_COUNTERS = {  # World.faults key -> probe
    "lease_expired": "kernel.lease_expired",
    "client_death": "client.death",
    "partition": "net.partition_started",
    "resend_client": "client.resend",
    "client_gave_up": "client.gave_up",
    "resend_mm": "mm.resend",
    "mm_gave_up": "mm.gave_up",
    "mm_rerun_no_effect": "mm.rerun.no_effect",
    "mm_rerun_after_effect": "mm.rerun.after_effect",
    "reply_settled_not_durable": "mm.reply_settled_not_durable",
    "reply_to_gone_connection": "mm.reply_to_gone_connection",
    "lost_mm_down": "net.request_to_dead_mm",
}
KERNEL_ENOMEM = ("proc_create", "map", "thread_create", "endpoint_create")
MM_ENOMEM = ("alloc", "accept")


def _declare() -> dict[str, str]:
    out = dict(CORE)
    for kind, variants in STEP_FAULT_VARIANTS.items():
        for v in variants:
            out[f"fault.{kind}{'.' + v if v else ''}"] = f"a {kind} fault applied{f' ({v})' if v else ''}"
    for name in FAMILIES:
        out[f"family.{name}"] = f"the {name} fault family switched on in the seed's plan"
    for words, name in CRASHES.items():
        out[name] = f"the mm crashed {words}"
    for kind in NET:
        out[f"net.{kind}"] = f"a message {kind.replace('_', ' ')}"
    for key, name in SIM_COUNTERS.items():
        out[name] = f"simulator counter {key}"
    for call in KERNEL_ENOMEM:
        out[f"kernel.enomem.{call}"] = f"the kernel answered {call} ENOMEM"
    for call in MM_ENOMEM:
        out[f"mm.enomem.{call}"] = f"the mm answered {call} ENOMEM"
    for lie in TOLD_LIES:  # the lie catalogue (clients.catalogue), as the simulator tells it
        out[probe_name(lie)] = f"the lie {lie.name!r} told to the {lie.server} (expected: {lie.expect.describe()})"
    out["sim.quiet_point"] = "a quiet point reached (I8 checked exactly, the mm's audit)"
    out["sim.liveness"] = "the liveness phase settled everything after the faults stopped"
    return out


PROBES: dict[str, str] = _declare()  # every probe name -> what hitting it means


def seed_probes(world: Any) -> Counter:
    """Every probe one run hit, with how often: the cores' (``world.probes``) and the simulator's."""
    out: Counter = Counter(world.probes)
    plan = world.plan
    last = min(world.step, world.steps)  # faults apply up to the violation, or until everything heals
    for step, items in plan.faults.items():
        if step <= last:
            for kind, variant in items:
                out[f"fault.{kind}{'.' + variant if variant else ''}"] += 1
    for name, rate in plan.families.items():
        if rate:
            out[f"family.{name}"] += 1
    faults = world.faults
    for key, n in faults.items():
        if key.startswith("mm_crash:"):
            where = key[9:]
            for words, name in CRASHES.items():
                if words in where:
                    out[name] += n
                    break
            else:
                out[f"crash.other:{where}"] += n  # (undeclared: CRASHES needs the new words)
    for kind in NET:
        if faults.get(kind):
            out[f"net.{kind}"] += faults[kind]
    for key, name in SIM_COUNTERS.items():
        if faults.get(key):
            out[name] += faults[key]
    for (target, call, outcome), n in world.stats.items():
        if outcome == "ENOMEM" and target in ("kernel", "mm"):
            out[f"{target}.enomem.{call}"] += n
        elif target.startswith("lie->"):
            out[call] += n  # (the lie's probe name: ``simulator.lies.probe_name``)
    if world.quiet_points:
        out["sim.quiet_point"] += world.quiet_points
    if world.liveness_steps is not None:
        out["sim.liveness"] += 1
    return out


def undeclared(hit: Any) -> list[str]:
    """Names hit that ``PROBES`` does not declare (a bug of the list)."""
    return sorted(n for n in hit if n not in PROBES)


def never_hit(hit: Any) -> list[str]:
    """Declared probes with no hit."""
    return [n for n in PROBES if not hit.get(n)]
