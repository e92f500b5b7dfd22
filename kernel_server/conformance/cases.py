"""Steps and cases, and how a case's expectations are recorded on the kernel core.

A ``Case`` is a boot map, then steps (a role, a call, its arguments); ``record(case)`` boots a
fresh ``KernelService`` from the boot map, sends each step as bytes through ``handle`` (so the
size and envelope rules apply as on the wire) and keeps, per step, the normative reply
(``normal.expected``) and the portable digest after it (``digest``).

What a vector may not assert: which free kernel frame the kernel hands out (for its objects, or
back to the mm by ``reclaim {count}``) is each implementation's choice. Only ``reclaim`` and
``frame_info`` observe it frame by frame. ``Certainty`` follows which kernel frames are surely
free or surely in use whatever the choices were; a step whose reply could differ under other
choices is dropped when it changed nothing (walks), or refused at export (scenarios); a
``reclaim {count}`` after which the frames' owners are not decided keeps its reply, gets no
digest and ends its case. Export cross-checks this on a core that allocates the highest free
frame first (``HighestFirst``): every step kept must give the same reply and digest there.

Symbolic frames: an argument ``{"$free": N}`` is the N lowest-numbered free kernel frames and
``{"$used": N}`` the N lowest kernel frames in use (as runs), read from the kernel (frame_info)
just before the step: how a vector names frames only the kernel's own choices determine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kernel_server.arch import get_profile
from kernel_server.bootmap import BootMap, Region
from kernel_server.conformance import digest as D
from kernel_server.conformance.normal import expected, resolve
from kernel_server.frames import KERNEL_FREE, KERNEL_SHARED, KERNEL_USED, NONE, USER, FrameTable
from kernel_server.invariants import check_kernel
from kernel_server.service import KernelService
from protocol import runs as R
from protocol import wire
from protocol.errors import Error

SYMBOLS = ("$free", "$used")


def key_for(role: str) -> str:
    """The in-process key of a role: 40 characters of the Z85 alphabet, the same on every run."""
    if role == "mm":
        return "M" * 40
    if role == "operator":
        return "O" * 40
    if role == "stranger":
        return "S" * 40
    return "C" + role.split("-")[1].rjust(39, "0")


def role_for(key: str) -> str:
    return {"M" * 40: "mm", "O" * 40: "operator", "S" * 40: "stranger"}.get(key) or (
        f"client-{int(key[1:])}" if key.startswith("C") and key[1:].isdigit() else "?")


@dataclass
class Step:
    role: str
    call: str
    args: dict[str, Any] = field(default_factory=dict)
    rule: str | None = None  # the rule this step must be refused by (checked at export), if any
    says: str | None = None  # words its message must hold (checked at export, never in the vector)


@dataclass
class Case:
    id: str
    comment: str
    arch: str
    regions: list[tuple[str, int, int]]  # the boot map: (kind, first frame, frames)
    steps: list[Step]
    setup: int = 0  # leading steps that only build the state the case is about
    flags: list[str] = field(default_factory=list)
    strict: bool = True  # every step must be decided by the design (scenarios); walks drop the rest
    optional: bool = False  # a pairing of rules that may turn out not to break the earlier one: left out then

    def bootmap(self) -> BootMap:
        return BootMap(tuple(Region(k, f, c) for k, f, c in self.regions))


class CaseError(AssertionError):
    """A scenario that does not test what it says (found at export)."""


class HighestFirst(FrameTable):
    """A free-list discipline other than the kernel's: the highest-numbered free frames go first."""

    def pop_free(self, count: int, max_runs: int | None = None) -> np.ndarray:
        free = np.flatnonzero(self.kind == KERNEL_FREE)[::-1][:count].copy()
        self.unlink_free(free)
        return free


def boot(arch: str, bootmap: BootMap, variant: type[FrameTable] | None = None, core: type | None = None
         ) -> KernelService:
    """An in-process kernel service booted from ``bootmap`` (``core``: a ``KernelCore`` subclass to use)."""
    if core is None:
        svc = KernelService.boot(arch=arch, bootmap=bootmap, mm_key=key_for("mm"),
                                 operator_key=key_for("operator"), lease_seconds=1e9)
    else:
        svc = KernelService(core(get_profile(arch), bootmap, key_for("mm"), key_for("operator")), 1e9)
    if variant is not None:
        svc.core.frames.__class__ = variant
    return svc


def symbolic(args: Any) -> bool:
    if isinstance(args, dict):
        return any(k in SYMBOLS for k in args) or any(symbolic(v) for v in args.values())
    if isinstance(args, list):
        return any(symbolic(v) for v in args)
    return False


def resolve_frames(args: Any, kinds: Callable[[], np.ndarray]) -> Any:
    """``args`` with each ``{"$free": N}`` / ``{"$used": N}`` element of a list of runs replaced by the runs
    of the N lowest frames of that kind (0: all of them); ``kinds()`` gives the kernel's kind per frame."""
    if isinstance(args, dict):
        return {k: resolve_frames(v, kinds) for k, v in args.items()}
    if isinstance(args, list):
        out: list[Any] = []
        for v in args:
            if isinstance(v, dict) and len(v) == 1 and next(iter(v)) in SYMBOLS:
                (sym, n), = v.items()
                want = KIND_CODE["kernel_free"] if sym == "$free" else KIND_CODE["kernel_used"]
                frames = np.flatnonzero(kinds() == want)
                out.extend(R.from_array(frames[:n] if n else frames))
            else:
                out.append(resolve_frames(v, kinds))
        return out
    return args


KIND_CODE = {"none": NONE, "kernel_free": KERNEL_FREE, "kernel_used": KERNEL_USED, "kernel_shared": KERNEL_SHARED,
             "user": USER}


class Runner:
    """One booted kernel service, running steps as bytes through ``handle`` with each role's key."""

    def __init__(self, arch: str, bootmap: BootMap, variant: type[FrameTable] | None = None) -> None:
        self.svc = boot(arch, bootmap, variant)
        self.core = self.svc.core
        self.req = 0

    def args_of(self, step: Step) -> dict[str, Any]:
        args = resolve(step.args, key_for)
        if symbolic(args):
            args = resolve_frames(args, lambda: self.core.frames.kind)
        return args

    def run(self, step: Step) -> tuple[dict[str, Any], dict[str, Any] | Error]:
        args = self.args_of(step)
        self.req += 1
        reply = wire.parse_reply(self.svc.handle(key_for(step.role), wire.request(self.req, step.call, args), 0.0))
        out = reply["result"] if reply["ok"] else Error.from_wire(reply["error"])
        return args, out

    def snapshot(self) -> D.Snapshot:
        return D.from_core(self.core, role_for)


class Certainty:
    """Which kernel frames are surely free or surely in use, whatever frames the kernel chose to allocate."""

    def __init__(self, core: Any) -> None:
        ft = core.frames
        self.sure_free = ft.kind == KERNEL_FREE  # at boot nothing is allocated
        self.core = core

    def held(self) -> int:
        return sum(p.kernel_used for p in self.core.procs.values())

    def uncertain(self) -> np.ndarray:
        """Kernel frames (free or in use, not boot-fixed) whose state the kernel's choices decided."""
        ft = self.core.frames
        if ft.free_count == 0 or self.held() == 0:
            return np.zeros(ft.n, dtype=bool)  # all in use, or none held by anyone: decided
        choosable = (ft.kind == KERNEL_FREE) | (ft.kind == KERNEL_USED)
        boot_used = np.zeros(ft.n, dtype=bool)
        for r in self.core.bootmap.of_kind("frame_table"):
            boot_used[r.first:r.end] = True
        return choosable & ~boot_used & ~self.sure_free

    def decided(self, call: str, args: dict[str, Any], out: Any) -> bool:
        """Would every implementation, whatever it allocated, give this reply? (Asked after the step, of the
        uncertainty before it: ``before()``.)"""
        unc = self._unc_before
        if call == "frame_info":
            return not any(unc[f:f + c].any() for f, c in args.get("frames", []) if type(f) is int
                           and type(c) is int and 0 <= f < unc.size)
        if call == "reclaim" and isinstance(args.get("frames"), list):
            if isinstance(out, Error) and out.code.name == "EINVAL":
                return True  # beyond memory, duplicates, not RAM, user-owned: decided before free or in use
            try:
                a = R.to_array(args["frames"])
            except Exception:
                return True
            a = a[(a >= 0) & (a < unc.size)]
            return not unc[a].any()
        return True

    def owners_decided_after_count_reclaim(self, taken: int, free_before: int) -> bool:
        """A reclaim {count} that took ``taken`` of ``free_before`` free frames: are the owners decided?"""
        return taken == 0 or (taken == free_before and not self._unc_before.any())

    def before(self) -> None:
        self._unc_before = self.uncertain()
        self._held_before = self.held()

    def after(self, call: str, args: dict[str, Any], out: Any) -> None:
        ft = self.core.frames
        if not isinstance(out, Error):
            if call == "donate":
                self.sure_free[R.to_array(args["frames"])] = True
            elif call == "reclaim":
                if "frames" in args:
                    self.sure_free[R.to_array(args["frames"])] = False
                else:
                    self.sure_free &= ft.kind == KERNEL_FREE
        if self.held() > self._held_before:  # the kernel allocated: any free frame may have been chosen
            self.sure_free[:] = False
        if self.held() == 0:  # nobody holds a kernel frame: every kernel frame but the boot's is free
            self.sure_free = ft.kind == KERNEL_FREE


@dataclass
class Recorded:
    case: Case
    steps: list[tuple[Step, dict[str, Any], str | None]]  # step, expected reply, digest after (None: not decided)
    initial: str
    dropped: int = 0
    ended: str = ""  # why the case ended before its last step, if it did


def record(case: Case, check: bool = True) -> Recorded:
    """Run ``case`` on the core and on a core with another free-list discipline; the steps kept, each
    with its expected reply and digest (see the module docstring)."""
    bm = case.bootmap()
    main = Runner(case.arch, bm)
    other = Runner(case.arch, bm, HighestFirst)
    cert = Certainty(main.core)
    rec = Recorded(case, [], main.snapshot().digest())
    for i, step in enumerate(case.steps):
        before = main.core.digest()
        free_before = main.core.frames.free_count
        cert.before()
        args, out = main.run(step)
        exp = expected(step.call, args, out, role_for)
        changed = main.core.digest() != before
        if case.strict or step.rule is not None:
            _check_rule(case, i, step, out)
        if check:
            problems = check_kernel(main.core)
            if problems:
                raise CaseError(f"{case.id} step {i} ({step.call}): the kernel breaks an invariant: {problems[0]}")
        if isinstance(out, Error) and changed:
            raise CaseError(f"{case.id} step {i}: refused {step.call} changed the kernel state (I6)")
        sym = symbolic(step.args)
        if sym:  # the frames the kernel chose: not the vector's to say
            _drop_frames(exp)
        decided = sym or cert.decided(step.call, args, out)
        cert.after(step.call, args, out)
        snap_digest: str | None = main.snapshot().digest()
        final = False
        if step.call == "reclaim" and "count" in args and not isinstance(out, Error):
            if not cert.owners_decided_after_count_reclaim(out["reclaimed"], free_before):
                snap_digest, final = None, True
        elif sym and changed:  # frames the kernel chose changed hands: their owners are not decided
            snap_digest, final = None, True
        if not decided:
            if case.strict:
                raise CaseError(f"{case.id} step {i} ({step.call} {args}): its reply depends on which frames the "
                                "kernel chose to allocate")
            if changed:
                rec.ended = f"step {i} ({step.call}) depends on the kernel's choice of frames"
                break
            rec.dropped += 1
            continue
        # the cross-check: the other discipline gives the same reply and (when decided) the same digest
        o_args, o_out = other.run(step)
        o_exp = expected(step.call, o_args, o_out, role_for)
        if sym:
            _drop_frames(o_exp)
        if o_exp != exp:
            raise CaseError(f"{case.id} step {i} ({step.call}): the reply depends on the free-list discipline "
                            f"({exp} vs {o_exp}): the certainty rules missed it")
        if snap_digest is not None and other.snapshot().digest() != snap_digest:
            raise CaseError(f"{case.id} step {i} ({step.call}): the digest depends on the free-list discipline")
        rec.steps.append((step, exp, snap_digest))
        if final:
            if case.strict and i != len(case.steps) - 1:
                raise CaseError(f"{case.id} step {i}: its owners are left undecided; it must be the case's last step")
            rec.ended = "" if i == len(case.steps) - 1 else f"step {i}: owners left undecided"
            break
    return rec


def _drop_frames(exp: dict[str, Any]) -> None:
    (exp["result"] if exp["ok"] else exp["details"]).pop("frames", None)


def _check_rule(case: Case, i: int, step: Step, out: Any) -> None:
    from kernel_server.calls import CALLS

    if step.rule is None:
        if isinstance(out, Error):
            raise CaseError(f"{case.id} step {i} ({step.call}): expected success, got {out.code.name}: {out.message}")
        return
    spec = CALLS.get(step.call)
    rule = spec.rule(step.rule) if spec is not None else None
    if not isinstance(out, Error):
        raise CaseError(f"{case.id} step {i} ({step.call}): expected rule {step.rule}, but it succeeded: {out}")
    code = rule.errno if rule is not None else None
    says = step.says if step.says is not None else (rule.says if rule is not None else "")
    if (code is not None and out.code != code) or says not in out.message:
        raise CaseError(f"{case.id} step {i} ({step.call}): expected rule {step.rule} "
                        f"({code.name if code else '?'}, {says!r}), got {out.code.name}: {out.message}")
