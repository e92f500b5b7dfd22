"""``mmsim chaos``: the fault plan comes from the seed alone, the checks that decide the exit
status catch what they must, and a real run survives every kind of fault with clean audits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from clients.attacks import ATTACKS
from mmsim import chaos as C
from mmsim.launcher import final_checks
from protocol import rundir
from support import mmsim


def test_the_plan_is_a_function_of_the_seed():
    kinds = C.attack_kinds()
    a = C.make_plan(7, 20.0, 4, kinds, lease=1.0)
    assert a == C.make_plan(7, 20.0, 4, kinds, lease=1.0)
    assert a != C.make_plan(8, 20.0, 4, kinds, lease=1.0)
    assert {f.action for f in a} == set(C.FAULTS)
    assert len(a) == int(20 / 1.5)
    assert [f.at for f in a] == sorted(f.at for f in a)
    assert all(0.5 <= f.at <= 19.0 for f in a)
    for f in a:
        if f.action in ("kill_client", "pause_client"):
            assert f.target in {f"client-{i}" for i in range(4)}
        elif f.action == "attack":
            assert f.target in ATTACKS
        else:
            assert f.target == "mm"
        if f.action.startswith("pause"):
            assert 0.2 <= f.hold <= 2.0
        else:
            assert f.hold == 0.0
    short = C.make_plan(1, 2.0, 4, kinds, lease=1.0)  # shorter than the faults: still one of each kind
    assert sorted(f.action for f in short) == sorted(C.FAULTS) and all(f.at <= 2.0 for f in short)


def test_the_plan_leaves_out_what_is_not_there():
    plan = C.make_plan(3, 10.0, 0, C.attack_kinds(), lease=1.0)
    assert {f.action for f in plan} == {"kill_mm", "pause_mm", "attack"}
    assert {f.action for f in C.make_plan(3, 10.0, 2, [], lease=1.0)} == set(C.FAULTS) - {"attack"}


class FakeSystem:
    """Stands in for ``System`` where only its answers matter: audits and kernel stats in turn."""

    def __init__(self, audits: list[dict], stats: list[dict] | None = None, lease: float = 0.05) -> None:
        self.audits, self.stats, self.lease = list(audits), list(stats or []), lease

    def audit(self, timeout: float = 30.0) -> dict:
        return self.audits.pop(0) if len(self.audits) > 1 else self.audits[0]

    def kernel_stats(self) -> dict:
        return self.stats.pop(0) if len(self.stats) > 1 else self.stats[0]


def _report(div: int, used: int = 0) -> dict:
    return {"divergences": div, "class_counts": {"free_but_mapped": div}, "pending": 0,
            "mm_view": {"kernel": 10, "free": 90 - used, "used": used, "ram": 100},
            "kernel_view": {"kernel": 10, "user_free": 90, "user_mapped": 0, "none": 0}}


def test_an_audit_after_a_fault_may_settle_but_a_lasting_divergence_is_a_violation():
    assert C._audit(FakeSystem([_report(0)])) == ("clean", "")
    text, violation = C._audit(FakeSystem([_report(2), _report(0)]))
    assert text.startswith("clean on try 2") and violation == ""
    text, violation = C._audit(FakeSystem([_report(3)]))
    assert text.startswith("DIVERGED") and "3 divergent" in violation


def _stats(processes: int = 0, mapped: int = 0, kernel_used: int = 5, user_free: int | None = None) -> dict:
    free = 80 - mapped if user_free is None else user_free
    return {"processes": processes, "ram": 100, "kernel_free": 10, "kernel_used": kernel_used, "kernel_shared": 5,
            "user_free": free, "user_mapped": mapped}


def test_final_checks_find_leaks_and_broken_conservation():
    boot = _stats()
    checks, _ = final_checks(FakeSystem([_report(0)], [_stats(processes=1, mapped=4), _stats()]), boot, 1.0)
    assert all(c.ok for c in checks), checks  # the last process went away while waiting
    checks, _ = final_checks(FakeSystem([_report(0, used=4)], [_stats(processes=1, mapped=4)]), boot, 0.2)
    failed = {c.name for c in checks if not c.ok}
    assert failed == {"no client process left (I11)", "no user frame mapped (I11)",
                      "no frame in use in the mm's view"}
    checks, _ = final_checks(FakeSystem([_report(0)], [_stats(kernel_used=6, user_free=79)]), boot, 0.2)
    assert {c.name for c in checks if not c.ok} == {"kernel memory back to its boot level"}
    checks, _ = final_checks(FakeSystem([_report(0)], [_stats(user_free=81)]), boot, 0.2)
    assert {c.name for c in checks if not c.ok} == {"conservation (I7)"}
    checks, _ = final_checks(FakeSystem([_report(1)], [_stats()]), boot, 0.2)
    assert {c.name for c in checks if not c.ok} == {"audit (I8)"}


# ---- the command ------------------------------------------------------------------------------------



def _plan_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("  ") and "s  " in ln]


def test_plan_only_prints_the_same_plan_for_the_same_seed(run_dir):
    fresh = os.path.join(run_dir, "never")
    a = mmsim("chaos", "--duration", "12", "--seed", "5", "--plan-only", "--run-dir", fresh)
    b = mmsim("chaos", "--duration", "12", "--seed", "5", "--plan-only")
    c = mmsim("chaos", "--duration", "12", "--seed", "6", "--plan-only")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr
    assert a.stdout == b.stdout and len(_plan_lines(a.stdout)) == int(12 / 1.5)
    assert _plan_lines(a.stdout) != _plan_lines(c.stdout)
    assert not os.path.exists(fresh)  # nothing was started
    bad = mmsim("chaos", "--memory", "12 parsecs", "--plan-only")
    assert bad.returncode == 2 and "--memory" in bad.stderr
    j = mmsim("chaos", "--duration", "12", "--seed", "5", "--plan-only", "--json", "--run-dir", fresh)
    assert j.returncode == 0 and _plan_lines(j.stderr) == _plan_lines(a.stdout)
    plan = json.loads(j.stdout)["plan"]  # the same plan, as data
    assert ["  " + C.Fault(**f).describe() for f in plan] == _plan_lines(a.stdout)
    assert not os.path.exists(fresh)


def test_chaos_survives_every_kind_of_fault(run_dir):
    r = mmsim("chaos", "--duration", "8", "--seed", "1", "--run-dir", run_dir, timeout=120)
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-2000:]
    plan = _plan_lines(out)
    assert {ln.split()[1] for ln in plan} == set(C.FAULTS)
    table = out[out.index("faults injected"):out.index("errors seen")]
    for kind in C.FAULTS:  # each row: planned, injected, every audit after it clean, no violation
        row = next(ln for ln in table.splitlines() if f" {kind} " in ln)
        cells = [c.strip() for c in row.split("│")[1:-1]]
        assert cells[0] == kind and int(cells[2]) >= 1 and cells[3] == cells[2], row
        assert cells[4].startswith(f"{cells[3]}/{cells[3]} clean") and cells[5] == "0", row
    assert "no violations" in out and "VIOLATION" not in out
    assert "mm-" in out or "attack-0" in out  # the attack's outcome is in the errors table
    report = rundir.read_report(run_dir)  # the same, as data
    assert report["command"] == "chaos" and report["exit"] == 0 and report["violations"] == []
    assert report["progress"] == {"planned": len(plan), "injected": len(plan)}
    assert {f["action"] for f in report["faults"]} == set(C.FAULTS) and all(c["ok"] for c in report["checks"])
    # a killed client's key is revoked; its replacement runs with a new key, admitted
    admitted = {g.name for g in rundir.admitted(run_dir).values()}
    for f in report["faults"]:
        if f["action"] == "kill_client":
            victim, new = f["note"].split()[1], f["note"].split("started ")[1].split()[0]
            assert victim not in admitted and new in admitted, (f["note"], admitted)
            assert rundir.public_key(run_dir, victim) != rundir.public_key(run_dir, new)


def test_ctrl_c_is_an_interruption_not_a_violation(run_dir, spawn):
    p = spawn([sys.executable, "-m", "mmsim.cli", "chaos", "--duration", "60", "--seed", "3", "--clients", "2",
               "--run-dir", run_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
              env={**os.environ, "COLUMNS": "250"})
    while True:
        line = p.stdout.readline().decode()
        assert line, "chaos ended before its first fault"
        if line.startswith("["):  # the first fault was injected
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (out.decode()[-3000:], err.decode()[-2000:])
    assert b"Traceback" not in err and b"VIOLATION" not in out
    report = rundir.read_report(run_dir)
    assert report["exit"] == 130 and report["violations"] == [] and report["interrupted"].startswith("after ")
    assert 1 <= report["progress"]["injected"] < report["progress"]["planned"]
    assert b"interrupted" in out and report["interrupted"].encode() in out  # says how far it got
    assert report["stopped"]["kernel"] == 0 and report["stopped"]["mm"] == 0  # stopped, not killed
    assert rundir.running(run_dir) == [] and not os.path.exists(rundir.ipc_dir(run_dir, create=False))
