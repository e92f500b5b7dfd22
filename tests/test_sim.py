"""The deterministic simulator: healthy seeds pass, a seed replays byte for byte, every planted bug is
found within a bounded number of seeds, and ``mmsim sim`` behaves as documented."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mmsim.cli import app
from simulator import checks, lies, mutants
from simulator.runner import BENCH_SETTINGS, bench, run_seed, run_seeds
from simulator.world import World

SWEEP_SEEDS = 300
SWEEP_STEPS = 1000
BUG_STEPS = 2000
BUG_SEEDS = 30  # each planted bug must be found within this many seeds

# each planted bug: the invariants meant to catch it, and the steps per seed and the number of seeds
# within which it must be found (the first seed that finds it is well inside each bound)
EXPECTED = {
    "donate_skips_refcount": ({"I9", "I3", "I5"}, BUG_STEPS, BUG_SEEDS),
    "unmap_forgets_decrement": ({"I4"}, BUG_STEPS, BUG_SEEDS),
    "mm_reply_before_journal": ({"I8"}, BUG_STEPS, BUG_SEEDS),
    "kernel_replay_disabled": ({"I12"}, BUG_STEPS, BUG_SEEDS),
    "lease_forgets_frames": ({"I4", "I11"}, BUG_STEPS, BUG_SEEDS),
    "map_partial_on_enomem": ({"I6"}, BUG_STEPS, BUG_SEEDS),
    # bugs the simulator found in the real mm, planted back as regressions
    "mm_undo_on_eio": ({"I4", "I8"}, BUG_STEPS, 40),
    "mm_volatile_replies": ({"I12"}, BUG_STEPS, BUG_SEEDS),
    "mm_trusts_empty_journal": ({"I8"}, 400, 100),
}


def test_healthy_seeds_have_no_violation():
    summary = run_seeds(range(SWEEP_SEEDS), steps=SWEEP_STEPS)
    failed = summary.failed
    assert failed is None, (f"seed {failed.seed} step {failed.violation.step}: {failed.violation.invariant} "
                            f"{failed.violation.message}\n" + "\n".join(failed.tail))
    assert summary.seeds == SWEEP_SEEDS
    # the faults the issue asks for all happened, and the system was checked while they did
    for kind in ("client_death", "mm_crash", "lie_client", "lie_mm", "partition", "partitioned", "lost",
                 "duplicated", "delayed", "lease_expired", "resend_client", "resend_mm", "mm_gave_up",
                 "mm_recovered"):
        assert summary.faults[kind] > 0, kind
    assert summary.quiet_points >= SWEEP_SEEDS  # I8 compared at least once per seed
    assert set(summary.archs) == {"i686", "i686-pae", "x86_64"}
    calls = {(t, c) for t, c, _ in summary.stats}
    for needed in (("mm", "alloc"), ("mm", "alloc(large)"), ("mm", "free"), ("mm", "share"), ("kernel", "donate"),
                   ("kernel", "thread_create"), ("kernel", "endpoint_create"), ("mm", "(replayed)"),
                   ("kernel", "(replayed)")):
        assert needed in calls, needed
    enomem = sum(n for (t, c, o), n in summary.stats.items() if t == "kernel" and o == "ENOMEM")
    assert enomem > 0  # starvation made the kernel refuse, and the mm donated and retried


def test_incremental_checks_agree_with_full_ones():
    """After every step of healthy runs, the exact incremental check (what the simulator runs between full
    recomputations) and the full recomputation both find nothing; the trackers' copies stay in step."""
    steps = 0
    for seed in range(12):
        w = World(seed, steps=800, check_every=0)
        while w.step < w.steps and not w.violations:
            w.one_step()
            steps += 1
            assert checks.kernel(w.kernel.core) == [], (seed, w.step)
            if w.mm.alive and w.mm.core is not None:
                assert checks.view(w.mm.core.view) == [], (seed, w.step)
        assert not w.violations, (seed, w.violations[0])
        w.finish()
        assert not w.violations, (seed, w.violations[0])
    assert steps >= 12 * 800


# the planted bugs a state check finds first: the exact incremental check must find each at the very step
# the full recomputation after every step does (and so with the same report)
STATE_BUGS = ("unmap_forgets_decrement", "lease_forgets_frames", "mm_undo_on_eio")


@pytest.mark.parametrize("bug", STATE_BUGS)
def test_incremental_checks_find_planted_bugs_when_full_ones_do(bug):
    full = run_seeds(range(BUG_SEEDS), steps=BUG_STEPS, bug=bug, check_every=1).failed
    incremental = run_seeds(range(BUG_SEEDS), steps=BUG_STEPS, bug=bug, check_every=0).failed
    assert full is not None and incremental is not None
    assert (incremental.seed, incremental.violation) == (full.seed, full.violation)
    assert incremental.violation.invariant in {"I4", "I8", "I11"}


def test_same_seed_same_trace_bytes(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    ra = run_seed(5, steps=1500, trace_path=str(a))
    rb = run_seed(5, steps=1500, trace_path=str(b))
    run_seed(6, steps=1500, trace_path=str(c))
    assert ra.ok and rb.ok
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    # how the state is checked changes nothing of the run
    for i, (every, incremental) in enumerate(((1, False), (0, True), (0, False))):
        other = tmp_path / f"d{i}.jsonl"
        assert run_seed(5, steps=1500, trace_path=str(other), check_every=every, incremental=incremental).ok
        assert other.read_bytes() == a.read_bytes()
    lines = a.read_text().splitlines()
    head = json.loads(lines[0])
    assert head["ev"] == "start" and head["seed"] == 5
    calls = [json.loads(x) for x in lines[1:] if '"ev":"call"' in x]
    assert len(calls) > 100
    assert {"from", "to", "id", "call", "args", "reply"} <= set(calls[0])


def test_a_failure_replays_exactly():
    """Every failure is reproducible from its seed: same violation, same step, same trace tail."""
    bug = "unmap_forgets_decrement"
    first = run_seeds(range(BUG_SEEDS), steps=BUG_STEPS, bug=bug).failed
    assert first is not None
    again = run_seed(first.seed, steps=BUG_STEPS, bug=bug)
    assert again.violation == first.violation
    assert again.tail == first.tail


def test_every_plantable_bug_has_a_bound():
    assert set(EXPECTED) == set(mutants.BUGS)


@pytest.mark.parametrize("bug", sorted(mutants.BUGS))
def test_planted_bug_is_found(bug):
    invariants, steps, seeds = EXPECTED[bug]
    summary = run_seeds(range(seeds), steps=steps, bug=bug)
    assert summary.failed is not None, f"{bug} was not found in {seeds} seeds of {steps} steps"
    assert summary.failed.violation.invariant in invariants, summary.failed.violation


def test_mm_crash_finds_unjournaled_replies_without_the_write_ahead_check(monkeypatch):
    """The write-ahead check finds an mm that replies before journaling at once; without it, crashes and
    restarts find it too (what the mm confirmed to a client is missing from its rebuilt view)."""
    from simulator import mm_node

    class Everything:
        def __contains__(self, item: object) -> bool:
            return True

        def add(self, item: object) -> None:
            pass

    boot = mm_node.MMNode.boot

    def boot_without_wal(self):
        boot(self)
        self.durable_outcomes = Everything()

    monkeypatch.setattr(mm_node.MMNode, "boot", boot_without_wal)
    failed = run_seeds(range(BUG_SEEDS), steps=BUG_STEPS, bug="mm_reply_before_journal").failed
    assert failed is not None and failed.violation.invariant in {"I4", "I8"}
    assert "before journaling" not in failed.violation.message


def test_lies_are_refused_and_checked():
    w = World(1, steps=1)
    for _ in range(60):
        lies.lie_client(w)
        w.apply_fault("lie_mm")
    assert not w.violations
    lied = {k for k in w.stats if k[0].startswith("lie->")}
    assert lied and all(o != "ok" for _, _, o in lied)


def test_cli_runs_and_reports():
    runner = CliRunner()
    ok = runner.invoke(app, ["sim", "--seeds", "5", "--steps", "200"])
    assert ok.exit_code == 0, ok.output
    assert "no violation in 5 seed(s)" in ok.output and "faults by kind" in ok.output
    bad = runner.invoke(app, ["sim", "--seeds", str(BUG_SEEDS), "--steps", str(BUG_STEPS), "--bug",
                              "kernel_replay_disabled", "-q"])
    assert bad.exit_code == 1, bad.output
    assert "VIOLATION of I12 at seed" in bad.output and "replay it: mmsim sim --seed" in bad.output
    for args in (["--steps", "0"], ["--trace", "x.jsonl"], ["--bug", "nope"], ["--arch", "arm"],
                 ["--memory", "1MiB"], ["--memory", "lots"]):
        r = runner.invoke(app, ["sim", *args])
        assert r.exit_code == 2, (args, r.output)


def test_cli_replays_one_seed_with_its_trace(tmp_path):
    trace = tmp_path / "t.jsonl"
    r = CliRunner().invoke(app, ["sim", "--seed", "3", "--steps", "400", "--trace", str(trace), "-q"])
    assert r.exit_code == 0, r.output
    assert trace.read_text().startswith('{"ev":"start","seed":3,')


def test_bench_reports_rates():
    out = bench(0.8, steps=300)
    for label, _every, _incremental in BENCH_SETTINGS:
        assert out[f"calls_per_s_checks_{label}"] > 0, out
    assert out["target_calls_per_s"] == 20_000 and isinstance(out["meets_target_with_checks_every_step"], bool)
