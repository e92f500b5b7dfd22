"""The deterministic simulator: healthy seeds pass (faults of every family reaching the mm's recovery, and a
liveness phase that settles everything), a seed replays byte for byte, every planted bug is found within a
bounded number of seeds, the simulator watches the kernel and the mm only through their declared seams, and
``mmsim sim`` behaves as documented."""

from __future__ import annotations

import ast
import dataclasses
import json
from collections import Counter
import pathlib

import numpy as np
import pytest
from typer.testing import CliRunner

from clients import catalogue as CAT
from kernel_server.observe import KernelObserver
from mmsim.cli import app
from protocol.errors import Errno, Error
from simulator import checks, lies, mutants
from simulator.faults import CRASH_POINTS, FAMILIES, make_plan
from simulator.runner import BENCH_SETTINGS, bench, detection, run_seed, run_seeds
from simulator.world import LIVENESS_STEPS, World

SWEEP_SEEDS = 400
SWEEP_STEPS = 1500
BUG_STEPS = 2000

# each planted bug: the invariants meant to catch it, and the number of seeds (of BUG_STEPS steps, from seed 0,
# swarm testing) within which it must be found. Each bound is the smallest that keeps the chance of a miss below
# about 0.2% at the share of seeds that found the bug among seeds 0-99 when it was set (in the comment)
EXPECTED = {
    "donate_skips_refcount": ({"I9", "I3", "I5"}, 15),  # 36%
    "unmap_forgets_decrement": ({"I4"}, 6),  # 64%
    "kernel_replay_disabled": ({"I12"}, 6),  # 66%
    "lease_forgets_frames": ({"I4", "I11"}, 20),  # 26%
    # bugs the simulator found in the real mm, planted back as regressions
    "mm_undo_on_eio": ({"I8"}, 15),  # 37%
    "mm_volatile_replies": ({"I12"}, 60),  # 10%
    "mm_trusts_empty_journal": ({"I8"}, 50),  # 12%
    "mm_reply_before_journal": ({"I8"}, 3),  # 98%
    "mm_never_probes": ({"I10"}, 6),  # 69%
    # the recovery judgements exact settlement replaced
    "recovery_one_snapshot": ({"I8"}, 40),  # 15%
    "recovery_frees_both_done": ({"I8"}, 60),  # 10%
}


@pytest.fixture(scope="module")
def sweep():
    return run_seeds(range(SWEEP_SEEDS), steps=SWEEP_STEPS)


def test_healthy_seeds_have_no_violation(sweep):
    failed = sweep.failed
    assert failed is None, (f"seed {failed.seed} step {failed.violation.step}: {failed.violation.invariant} "
                            f"{failed.violation.message}\n" + "\n".join(failed.tail))
    assert sweep.seeds == SWEEP_SEEDS
    assert sweep.quiet_points >= SWEEP_SEEDS  # I8 (exactly) and the mm's audit at least once per seed
    assert set(sweep.archs) == {"i686", "i686-pae", "x86_64"}
    calls = {(t, c) for t, c, _ in sweep.stats}
    for needed in (("mm", "alloc"), ("mm", "free"), ("mm", "share"), ("mm", "accept"), ("kernel", "donate"),
                   ("kernel", "thread_create"), ("kernel", "endpoint_create"), ("kernel", "mappings"),
                   ("mm", "(replayed)"), ("kernel", "(replayed)")):
        assert needed in calls, needed
    enomem = sum(n for (t, c, o), n in sweep.stats.items() if t == "kernel" and o == "ENOMEM")
    assert enomem > 0  # starvation made the kernel refuse, and the mm donated and retried


def test_every_fault_family_is_switched_on_and_off_and_reaches_recovery(sweep):
    """Swarm testing: each family was on in some seeds and off in others, and the faults reached what they aim
    at: the kernel lost after it carried out each kind of call the mm makes that changes something, an mm crash
    at every boundary and during recovery, intents settled by recovery both ways, requests failing fast while
    the kernel was lost and running again, the liveness phase settling everything."""
    for name in FAMILIES:
        assert 0 < sweep.families[name] < SWEEP_SEEDS, name
    f = sweep.faults
    for kind in ("client_death", "mm_crash", "partition", "partitioned", "lost", "duplicated", "delayed",
                 "lease_expired", "resend_client", "resend_mm", "mm_gave_up", "lie_client", "lie_mm",
                 "settled_by_recovery:done", "settled_by_recovery:undo", "mm_rerun_no_effect", "reply_lost"):
        assert f[kind] > 0, kind
    lost_replies = {k.split(":", 1)[1] for k in f if k.startswith("reply_lost:")}
    assert {"map", "unmap", "donate", "proc_create", "mappings", "frame_info", "events", "hello"} <= lost_replies
    crashes = " ".join(k for k in f if k.startswith("mm_crash:"))
    for where in ("at a step", "reply to map", "reply to unmap", "reply to donate", "not committed",
                  "right after a journal commit", "about to send its reply", "during recovery"):
        assert where in crashes, where
    assert 0 < sweep.liveness_steps < LIVENESS_STEPS


def test_a_plan_names_its_families_and_the_fixed_mix_has_them_all():
    swarm = [make_plan(s, 2000) for s in range(40)]
    assert len({tuple(sorted(k for k, v in p.families.items() if v)) for p in swarm}) > 20  # which are on differs
    on = [sum(1 for v in p.families.values() if v) for p in swarm]
    assert min(on) < len(FAMILIES) // 2 < max(on)
    fixed = make_plan(3, 2000, mode="fixed")
    assert all(fixed.families[name] == fam.fixed for name, fam in FAMILIES.items())
    assert sorted(fixed.workloads) == ["kobjects", "sharer", "sparse", "steady"]
    assert {"mm_crash", "reply_loss"} <= set(fixed.describe()["families"])
    assert set(CRASH_POINTS) >= {"kernel_reply", "journal", "commit", "client_reply"}


def test_incremental_checks_agree_with_full_ones():
    """After every step of healthy runs, the exact incremental check (what the simulator runs between full
    recomputations) and the full recomputation both find nothing; the trackers' copies stay in step."""
    steps = 0
    for seed in range(5):
        w = World(seed, steps=600, check_every=0)
        while w.step < w.steps and not w.violations:
            w.one_step()
            steps += 1
            assert checks.kernel(w.kernel.core) == [], (seed, w.step)
            if w.mm.alive and w.mm.core is not None:
                assert checks.view(w.mm.core.view) == [], (seed, w.step)
        assert not w.violations, (seed, w.violations[0])
        w.liveness()
        assert not w.violations, (seed, w.violations[0])
    assert steps >= 5 * 600


# the planted bugs a state check finds first: the exact incremental check must find each at the very step the
# full recomputation after every step does (and so with the same report)
STATE_BUGS = ("unmap_forgets_decrement", "lease_forgets_frames")


@pytest.mark.parametrize("bug", STATE_BUGS)
def test_incremental_checks_find_planted_bugs_when_full_ones_do(bug):
    full = run_seeds(range(10), steps=BUG_STEPS, bug=bug, check_every=1, confirm=False).failed
    incremental = run_seeds(range(10), steps=BUG_STEPS, bug=bug, check_every=0, confirm=False).failed
    assert full is not None and incremental is not None
    assert (incremental.seed, incremental.violation) == (full.seed, full.violation)
    assert incremental.violation.invariant in {"I4", "I11"}


class _Feed(KernelObserver):
    """Forwards the kernel's reports of writes to a tracker (as the simulator's kernel node does)."""

    tracker: checks.KernelTracker | None = None

    def frames_written(self, frames):
        if self.tracker is not None:
            self.tracker.written(frames)

    def process_changed(self, pid):
        if self.tracker is not None:
            self.tracker.changed(pid)


def _tracked_kernel(arch: str):
    """A kernel with two processes, small, shared and large mappings, a client's own map, threads, endpoints,
    donated frames, its tracker in step (every check so far clean)."""
    from kernel_server.frames import KERNEL_SHARED, USER
    from kernel_server.service import KernelService

    feed = _Feed()
    svc = KernelService.boot(arch=arch, memory=32 << 20, mm_key="M" * 40, kernel_pool_frames=24, observer=feed)
    core = svc.core
    t = feed.tracker = checks.KernelTracker(core)
    ft = core.frames

    def ok(who, call, **args):
        out = svc.call(who, call, args)
        assert not isinstance(out, Error), (call, out)
        assert t.check() == [], call
        return out

    a = ok("M" * 40, "proc_create", key="A" * 40, kernel_quota=12)["pid"]
    b = ok("M" * 40, "proc_create", key="B" * 40, kernel_quota=12)["pid"]
    user = np.flatnonzero((ft.kind == USER) & (ft.refs == 0))
    ok("M" * 40, "map", pid=a, vaddr=0x1000_0000, frames=[[int(f), 1] for f in user[:5]], prot=3)
    ok("M" * 40, "map", pid=b, vaddr=0x1000_0000, frames=[[int(user[0]), 1]], prot=1)
    shared = int(np.flatnonzero(ft.kind == KERNEL_SHARED)[0])
    ok("A" * 40, "map", vaddr=0x1040_0000, frames=[[shared, 1]], prot=1)
    step = core.profile.pages_at(max(core.profile.large_levels))
    free = (ft.kind == USER) & (ft.refs == 0)
    n = (ft.n // step) * step
    large = int(np.flatnonzero(free[:n].reshape(-1, step).all(axis=1))[-1]) * step
    ok("M" * 40, "map", pid=b, vaddr=0x4000_0000, frames=[[large, step]], prot=3, large=True)
    ok("A" * 40, "thread_create")
    ok("A" * 40, "endpoint_create")
    ok("M" * 40, "donate", frames=[[int(f), 1] for f in user[-6:]])
    ok("M" * 40, "unmap", pid=a, vaddr=0x1000_1000, pages=2)
    return core, t, a, b, [int(f) for f in user[:5]], large


CORRUPTIONS = {  # what a step did wrong, with what it reported -> the invariant the tracker must name
    "refcount bumped": ("I4", lambda core, t, a, b, small, large: (core.frames.refs.__setitem__(small[0], 5),
                                                                   t.written(small[0]))),
    "a mapped frame made kernel-free": ("I3", lambda core, t, a, b, small, large: (
        core.frames.kind.__setitem__(small[0], 1), t.written(small[0]))),  # no process reported: the frame's
    # mappings are judged from its counts
    "a leaf entry rewritten to a kernel frame": ("I3", lambda core, t, a, b, small, large: (
        _rewrite_entry(core, a, lambda e: (int(np.flatnonzero(core.frames.kind == 2)[-1]) << 4) | 3), t.changed(a))),
    "a client-made map of a user frame": ("I9", lambda core, t, a, b, small, large: (
        _rewrite_entry(core, a, lambda e: e | 8), t.changed(a))),
    "a table count that lies": ("tables", lambda core, t, a, b, small, large: (
        core.procs[a].tables.__getitem__(next(k for k in core.procs[a].tables if k[0] == core.leaf)).__setitem__(
            1, 99), t.changed(a))),
    "a large page over a kernel-shared frame": ("I3", lambda core, t, a, b, small, large: (
        core.frames.kind.__setitem__(large + 1, 3), t.written(large + 1))),
    "a cycle cut off the free list": ("I2", lambda core, t, a, b, small, large: _cycle(core, t)),
    "a charge that lies": ("I13", lambda core, t, a, b, small, large: (
        setattr(core.procs[a], "kernel_used", core.procs[a].kernel_used - 1), t.changed(a, objects_only=True))),
}


def _rewrite_entry(core, pid, how):
    from kernel_server.pagetable import EMPTY

    for e in core.procs[pid].leaves.values():
        idx = np.flatnonzero(e != EMPTY)
        if idx.size:
            e[idx[0]] = how(int(e[idx[0]]))
            return


def _cycle(core, t):
    from kernel_server.frames import NIL

    ft = core.frames
    walk = ft.free_list()
    x, y, z = walk[-3], walk[-2], walk[-1]
    ft.next[x] = NIL
    ft.next[y], ft.prev[y] = z, z
    ft.next[z], ft.prev[z] = y, y
    for f in (x, y, z):
        t.written(f)


@pytest.mark.parametrize("arch", ["i686", "i686-pae", "x86_64"])
@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
def test_the_kernel_tracker_finds_what_a_step_broke(arch, what):
    """The exact incremental check, fed what a step reported, finds each kind of corruption it could make, and
    the full check agrees."""
    core, t, *rest = _tracked_kernel(arch)
    invariant, corrupt = CORRUPTIONS[what]
    corrupt(core, t, *rest)
    found = t.check()
    assert any(p.startswith(invariant) for p in found), found
    assert any(p.startswith(invariant) for p in checks.kernel(core))


@pytest.mark.parametrize("what", sorted(__import__("test_invariants").MUTATIONS))
def test_the_state_lies_are_judged_by_sees_every_change(what):
    """``checks.state`` (what a forged request must leave as it was) sees every change ``KernelCore.digest``
    sees."""
    import test_invariants

    k = test_invariants.Healthy("i686-pae")
    before = checks.state(k.core)
    assert checks.state(k.core) == before
    test_invariants.MUTATIONS[what](k)
    assert checks.state(k.core) != before


def test_same_seed_same_trace_bytes(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    ra = run_seed(5, steps=1500, trace_path=str(a))
    rb = run_seed(5, steps=1500, trace_path=str(b))
    run_seed(6, steps=1500, trace_path=str(c))
    assert ra.ok and rb.ok
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    # how the state is checked changes nothing of the run; the hash of the trace is the hash of the file
    import hashlib

    for i, (every, incremental) in enumerate(((1, False), (0, True), (0, False))):
        other = tmp_path / f"d{i}.jsonl"
        assert run_seed(5, steps=1500, trace_path=str(other), check_every=every, incremental=incremental).ok
        assert other.read_bytes() == a.read_bytes()
    assert run_seed(5, steps=1500, trace_hash=True).trace_hash == hashlib.sha256(a.read_bytes()).hexdigest()
    lines = a.read_text().splitlines()
    head = json.loads(lines[0])
    assert head["ev"] == "start" and head["seed"] == 5 and head["mode"] == "swarm"
    assert head["families"] == {k: round(v, 6) for k, v in make_plan(5, 1500).families.items() if v}
    calls = [json.loads(x) for x in lines[1:] if '"ev":"call"' in x]
    assert len(calls) > 100
    assert {"from", "to", "id", "call", "args", "reply"} <= set(calls[0])
    assert any(json.loads(x)["ev"] == "heal" for x in lines)


def test_a_failure_replays_exactly():
    """Every failure is reproducible from its seed: same violation, same step, same trace tail; a failing seed
    of a sweep is replayed twice, and the two traces hash the same."""
    bug = "recovery_frees_both_done"
    first = run_seeds(range(EXPECTED[bug][1]), steps=BUG_STEPS, bug=bug).failed
    assert first is not None
    assert len(first.replays) == 2 and first.replays[0] == first.replays[1] != "differs"
    again = run_seed(first.seed, steps=BUG_STEPS, bug=bug)
    assert again.violation == first.violation
    assert again.tail == first.tail


def test_every_plantable_bug_has_a_bound():
    assert set(EXPECTED) == set(mutants.BUGS)


@pytest.mark.parametrize("bug", sorted(mutants.BUGS))
def test_planted_bug_is_found(bug):
    invariants, seeds = EXPECTED[bug]
    summary = run_seeds(range(seeds), steps=BUG_STEPS, bug=bug, confirm=False)
    assert summary.failed is not None, f"{bug} was not found in {seeds} seeds of {BUG_STEPS} steps"
    assert summary.failed.violation.invariant in invariants, summary.failed.violation


def test_the_judge_of_settlements_finds_what_a_repair_would_hide():
    """The old recovery's misjudged free is repaired afterwards (the view ends up matching the kernel), so only
    the judge of each settlement against what the kernel executed finds it: it names the intent and the request."""
    r = run_seeds(range(EXPECTED["recovery_frees_both_done"][1]), steps=BUG_STEPS, bug="recovery_frees_both_done",
                  confirm=False).failed
    assert r is not None and "the mm settled intent" in r.violation.message and "unmap" in r.violation.message


def test_the_write_ahead_check_finds_replies_before_journaling():
    """The planted write-behind service is found by the write-ahead check; without it nothing a client sees goes
    wrong (exact settlement re-derives a lost outcome from the kernel after a crash), so that check is what finds
    it."""
    r = run_seed(0, steps=BUG_STEPS, bug="mm_reply_before_journal")
    assert not r.ok and "before its outcome was durable" in r.violation.message
    assert run_seeds(range(5), steps=BUG_STEPS, bug="mm_reply_before_journal", confirm=False).failed is not None
    quiet = [run_seed(s, steps=BUG_STEPS, bug="mm_reply_before_journal", wal_check=False) for s in range(4)]
    assert all(q.ok for q in quiet), [q.violation for q in quiet]


def test_liveness_is_bounded_and_a_stuck_mm_is_found():
    r = run_seed(2, steps=BUG_STEPS)
    assert r.ok and r.liveness_steps is not None and r.liveness_steps < LIVENESS_STEPS
    stuck = run_seeds(range(EXPECTED["mm_never_probes"][1]), steps=BUG_STEPS, bug="mm_never_probes",
                      confirm=False).failed
    assert stuck is not None and stuck.violation.message.startswith("liveness:")
    assert stuck.violation.step > BUG_STEPS  # nothing is wrong at any one step: only the healed system shows it


def _lying(monkeypatch: pytest.MonkeyPatch, rate: float = 0.1) -> None:
    """Every seed's plan tells lies, often."""
    for name in ("lie_client", "lie_mm"):
        monkeypatch.setitem(FAMILIES, name, dataclasses.replace(FAMILIES[name], fixed=rate, low=rate, high=rate,
                                                                on=1.0))


def test_the_simulator_tells_the_catalogue_and_each_lie_gets_its_exact_answer(monkeypatch):
    _lying(monkeypatch)
    told: Counter = Counter()
    for seed in range(25):
        for mode in ("fixed", "swarm"):
            r = run_seed(seed, steps=1200, mode=mode)
            assert r.ok, (seed, mode, r.violation)
            for (target, name, outcome), n in r.stats.items():
                if target.startswith("lie->"):
                    assert outcome == "as expected", (name, outcome)
                    told[name] += n
    names = {lies.probe_name(x): x for x in lies.TOLD_LIES}
    assert set(told) <= set(names)
    assert len(told) >= 0.95 * len(names), sorted(set(names) - set(told))  # (offers left open are rare)
    for group in (lies.CLIENT_LIES, lies.STRANGER_LIES, lies.MM_KEY_LIES):
        missed = [x.name for x in group if lies.probe_name(x) not in told]
        assert len(missed) <= len(group) // 20, missed
    assert {names[n].server for n in told} == {"kernel", "mm"}


@pytest.mark.parametrize("wrong", ["refused for another reason", "accepted"])
def test_a_lie_answered_otherwise_than_the_catalogue_says_is_a_violation(monkeypatch, wrong):
    """The judgement can fail: a catalogue entry the server does not meet (an errno it does not give; a call it
    answers ok) is flagged, naming the lie."""
    _lying(monkeypatch, 0.2)
    if wrong == "accepted":  # a "lie" the kernel must accept: a ping
        bad = dataclasses.replace(lies.CLIENT_LIES[0], kind="planted", label="a ping", call="ping",
                                  build=lambda s: {}, needs=(), expect=CAT.refused(Errno.EPERM))
    else:  # a true lie whose expected errno is wrong
        real = next(x for x in lies.CLIENT_LIES if x.kind == "donate-unprivileged")
        bad = dataclasses.replace(real, kind="planted", expect=CAT.refused(Errno.EEXIST))
    monkeypatch.setattr(lies, "CLIENT_LIES", [bad])
    monkeypatch.setattr(lies, "STRANGER_LIES", [bad])
    r = run_seed(1, steps=1200, mode="fixed")
    assert r.violation is not None and "'planted: " in r.violation.message, r.violation
    assert r.violation.invariant == ("I9" if wrong == "accepted" else "I10")
    assert ("EPERM" if wrong == "accepted" else "EEXIST") in r.violation.message


# ---- the one declared seam: no patching of the cores or services ------------------------------------------

def _patched_methods() -> set[str]:
    from kernel_server.core import KernelCore
    from kernel_server.frames import FrameTable
    from kernel_server.process import Process
    from kernel_server.service import KernelService
    from mm_service.driver import Driver
    from mm_service.policy import MMCore
    from mm_service.service import MMService
    from mm_service.view import View
    from protocol.replay import ReplayCache

    return {n for cls in (KernelCore, KernelService, FrameTable, Process, ReplayCache, MMCore, MMService, Driver, View)
            for n in dir(cls) if not n.startswith("__") and callable(getattr(cls, n, None))}


OWNED = {"core", "svc", "service", "driver", "view", "replay", "frames", "ft", "durable"}  # names of cores/services


def monkeypatches(source: str, methods: set[str]) -> list[str]:
    """Assignments in ``source`` to a method of a core or service, or to any attribute of one (by the names the
    simulator gives them), other than a class setting its own (``self.x = ...``); and ``setattr`` calls."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            out.append(f"line {node.lineno}: setattr(...)")
            continue
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        else:
            continue
        while targets:
            t = targets.pop()
            if isinstance(t, (ast.Tuple, ast.List)):
                targets.extend(t.elts)
                continue
            if not isinstance(t, ast.Attribute):
                continue
            base = t.value
            if isinstance(base, ast.Name) and base.id == "self":
                continue
            owner = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
            if t.attr in methods or owner in OWNED:
                out.append(f"line {node.lineno}: {ast.unparse(t)} = ...")
    return out


def test_the_simulator_patches_no_core_or_service():
    methods = _patched_methods()
    found = {}
    for path in sorted(pathlib.Path(__file__).resolve().parents[1].joinpath("simulator").glob("*.py")):
        bad = monkeypatches(path.read_text(), methods)
        if bad:
            found[path.name] = bad
    assert not found, f"the simulator patches cores or services (use the observer seams): {found}"


@pytest.mark.parametrize("source", [
    "svc._execute = execute", "core.call = call", "view.apply = apply", "service.replay.lookup = lookup",
    "world.kernel.svc.handle = h", "self.svc.replay = NoReplay()", "a, core.frames = 1, 2", "setattr(core, 'call', f)",
    "d.core.record = watched", "ft.push_free = push",
])
def test_the_patch_finder_finds_patches(source):
    assert monkeypatches(source, _patched_methods()), source


def test_the_patch_finder_lets_a_class_set_its_own_attributes():
    assert not monkeypatches("class K:\n    def __init__(self):\n        self.replay = 1\n        self.core = 2\n"
                             "w.kernel_dirty = True\nc.alive = False\n", _patched_methods())


# ---- mmsim sim -------------------------------------------------------------------------------------------

RUNNER = CliRunner()


def test_cli_runs_and_reports():
    ok = RUNNER.invoke(app, ["sim", "--seeds", "3", "--steps", "300"])
    assert ok.exit_code == 0, ok.output
    assert "no violation in 3 seed(s)" in ok.output and "faults by kind" in ok.output
    assert "client operations" in ok.output


def test_cli_a_violation_writes_its_trace_and_view(tmp_path):
    bug = "kernel_replay_disabled"
    bad = RUNNER.invoke(app, ["sim", "--seeds", "5", "--steps", str(BUG_STEPS), "--bug", bug, "-q",
                              "--out", str(tmp_path)])
    assert bad.exit_code == 1, bad.output
    assert "VIOLATION of I12 at seed 0" in bad.output and "replay it: mmsim sim --seed 0" in bad.output
    assert "replayed twice: the same trace both times" in bad.output
    trace, view = tmp_path / "sim-0.jsonl", tmp_path / "sim-0.view.html"
    assert f"view of the run: {view}" in bad.output
    assert trace.read_text().startswith('{"ev":"start","seed":0,')
    html = view.read_text()
    assert html.startswith("<!DOCTYPE html>") and "I12" in html


def test_cli_json(tmp_path):
    r = RUNNER.invoke(app, ["sim", "--seeds", "2", "--steps", "300", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["seeds"] == 2 and doc["violation"] is None and doc["client_ops"] > 0
    assert doc["client_ops_per_cpu_s"] > 0 and "mm_crash" in FAMILIES
    bad = RUNNER.invoke(app, ["sim", "--seed", "0", "--steps", str(BUG_STEPS), "--bug", "unmap_forgets_decrement",
                              "--json", "--trace", str(tmp_path / "t.jsonl")])
    assert bad.exit_code == 1
    doc = json.loads(bad.stdout)
    assert doc["violation"]["invariant"] == "I4" and doc["violation"]["deterministic"] is True
    assert doc["files"]["view"] == str(tmp_path / "t.view.html") and (tmp_path / "t.view.html").exists()


@pytest.mark.parametrize("args", [
    ["--steps", "0"], ["--trace", "x.jsonl"], ["--bug", "nope"], ["--arch", "arm"], ["--memory", "1MiB"],
    ["--memory", "lots"], ["--seed", "3", "--seeds", "4"], ["--seed", "3", "--start", "2"], ["--mode", "chaos"],
    ["--seeds", "0"],
])
def test_cli_usage_errors(args):
    r = RUNNER.invoke(app, ["sim", *args])
    assert r.exit_code == 2, (args, r.output)


def test_cli_replays_one_seed_with_its_trace(tmp_path):
    trace = tmp_path / "t.jsonl"
    r = RUNNER.invoke(app, ["sim", "--seed", "3", "--steps", "400", "--trace", str(trace), "-q"])
    assert r.exit_code == 0, r.output
    assert trace.read_text().startswith('{"ev":"start","seed":3,')


def test_cli_checks_determinism():
    r = RUNNER.invoke(app, ["sim", "--seeds", "3", "--start", "7", "--steps", "400", "--check-determinism", "-q"])
    assert r.exit_code == 0, r.output
    assert "deterministic: 3 seed(s) each wrote the same trace twice" in r.output
    j = RUNNER.invoke(app, ["sim", "--seed", "4", "--steps", "300", "--check-determinism", "--json"])
    doc = json.loads(j.stdout)
    assert j.exit_code == 0 and doc["differ"] == [] and doc["checked"][0]["same"] is True


def test_cli_ctrl_c_says_how_to_resume(monkeypatch):
    import simulator.runner as runner

    real = runner.run_seed
    calls = {"n": 0}

    def interrupted(seed, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(seed, *a, **k)

    monkeypatch.setattr(runner, "run_seed", interrupted)
    r = RUNNER.invoke(app, ["sim", "--start", "10", "--seeds", "6", "--steps", "200"])
    assert r.exit_code == 130, r.output
    assert "interrupted after 2 of 6 seed(s)" in r.output
    assert "resume with: mmsim sim --start 12 --seeds 4 --steps 200" in r.output


# ---- the benchmarks ----------------------------------------------------------------------------------------

def test_bench_reports_client_operations_per_cpu_second():
    out = bench(0.8, steps=300)
    for label, _every, _incremental in BENCH_SETTINGS:
        assert out[f"ops_per_s_checks_{label}"] > 0, out


def test_detection_counts_seeds_both_ways():
    got = detection(["unmap_forgets_decrement", "mm_reply_before_journal"], most=3, steps=BUG_STEPS)
    assert set(got["unmap_forgets_decrement"]) == {"swarm", "fixed"}
    for mode in ("swarm", "fixed"):
        d = got["mm_reply_before_journal"][mode]
        assert d["first"] == 1 and d["found"] == 3 and d["per_find"] == 1.0  # every seed finds it
