"""Swarm testing at scale: seed ranges on a local process pool and on a real Dask cluster give the same failures
as running the seeds one by one, the seed database keeps and de-duplicates them (and never counts a range
twice, resumes, merges per-pod files), a failing seed shrinks to a much smaller capsule that replays to the same
fingerprint, the recorded decisions replay a seed exactly, and every probe a run hits is declared."""

from __future__ import annotations

import json
import pathlib

import pytest
from typer.testing import CliRunner

from mmsim.cli import app
from clients import catalogue as CAT
from simulator import lies, probes, shrink, swarm
from simulator.seeddb import SeedDB, code_version
from simulator.swarm import SwarmConfig, fingerprint, normalise, run_range
from simulator.trace import HashSink
from simulator.world import Violation, World

RUNNER = CliRunner()
BUG = "unmap_forgets_decrement"  # found by most seeds within a few hundred steps
STEPS = 600


def _json(r):
    assert r.exit_code in (0, 1), r.output
    return json.loads(r.stdout)


# ---- fingerprints -----------------------------------------------------------------------------------------

def test_fingerprints_ignore_numbers_names_and_lists_but_not_the_invariant_or_site():
    a = Violation("I8", "the mm settled intent 17 (unmap of 4 page(s) at 0x400000 for c3, request #9 of c3-peer) "
                        "as done, e.g. [(1, 2, 3), (4, 5, 6)]", 1, 1)
    b = Violation("I8", "the mm settled intent 203 (unmap of 1 page(s) at 0x7f000 for c12, request #40 of c1-peer) "
                        "as done, e.g. [(9, 9, 9)]", 7, 7)
    assert fingerprint(a, "-") == fingerprint(b, "-")
    assert fingerprint(a, "-").id == fingerprint(b, "-").id and len(fingerprint(a, "-").id) == 12
    assert fingerprint(a, "-") != fingerprint(a, "kernel.map")
    assert fingerprint(a, "-") != fingerprint(Violation("I4", a.message, 1, 1), "-")
    assert "cN-peer" in normalise(a.message) and "0x" not in normalise(a.message)


# ---- the local pool and the seed database -------------------------------------------------------------------

def test_a_swarm_on_the_local_pool_finds_what_seeds_one_by_one_find_and_resumes(tmp_path):
    db = str(tmp_path / "db")
    args = ["swarm", "--seeds", "24", "--batch", "6", "--workers", "2", "--steps", str(STEPS), "--bug", BUG,
            "--db", db, "--json"]
    first = _json(RUNNER.invoke(app, args))
    alone = run_range(SwarmConfig(steps=STEPS, bug=BUG).to_json(), 0, 24)
    failing = sorted(f["seed"] for f in alone["failures"])
    # the site is the call in progress when the invariant broke (this bug breaks I4 in the kernel's unmap)
    assert {f["fingerprint"]["site"] for f in alone["failures"]} == {"kernel.unmap"}
    assert first["run"] == 24 and first["failed"] == len(failing) > 0 and first["ranges"] == 4
    rep = first["database"]
    assert rep["seeds"] == 24 and rep["failed"] == len(failing)
    fps = {f["fingerprint"]["id"] for f in alone["failures"]}
    assert {f["fingerprint"] for f in rep["fingerprints"]} == fps == set(first["fingerprints_this_run"])
    top = rep["fingerprints"][0]
    assert top["smallest_seed"] == failing[0] and top["trace_seed"] == failing[0]
    assert top["replay"] == f"mmsim sim --seed {failing[0]} --steps {STEPS} --bug {BUG}"
    assert rep["code"] == code_version() and rep["probes"]["sim.quiet_point"][0] > 0
    with SeedDB(db) as store:  # the stored trace is what mmsim sim --trace writes for that seed
        seed, text = store.trace(rep["config_id"], top["fingerprint"])
    assert seed == failing[0] and text.startswith(f'{{"ev":"start","seed":{seed},')
    again = _json(RUNNER.invoke(app, args))  # run again: every range is recorded already
    assert again["skipped"] == 24 and again["run"] == 0 and again["database"]["seeds"] == 24


def test_ctrl_c_keeps_finished_ranges_and_the_same_command_resumes(tmp_path, monkeypatch):
    db = str(tmp_path / "db")
    real = swarm.run_swarm

    def interrupted(*a, **k):
        it = real(*a, **k)
        yield next(it)
        it.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(swarm, "run_swarm", interrupted)
    args = ["swarm", "--seeds", "12", "--batch", "4", "--workers", "1", "--steps", "300", "--db", db, "-q"]
    r = RUNNER.invoke(app, args)
    assert r.exit_code == 130, r.output
    assert "interrupted after 4 of 12 seed(s)" in r.output and "run the same command again" in r.output
    monkeypatch.setattr(swarm, "run_swarm", real)
    done = _json(RUNNER.invoke(app, [*args, "--json"]))
    assert done["skipped"] == 4 and done["run"] == 8 and done["database"]["seeds"] == 12


def test_pods_write_their_own_databases_and_merge_folds_them_once(tmp_path, monkeypatch):
    pods = [str(tmp_path / f"pod-{i}") for i in range(2)]
    for i, pod in enumerate(pods):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(i))
        r = RUNNER.invoke(app, ["swarm", "range", "--seeds-per-index", "8", "--batch", "4", "--steps", str(STEPS),
                                "--bug", BUG, "--db", pod, "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["first"] == 8 * i
    main = str(tmp_path / "main")
    m = _json(RUNNER.invoke(app, ["swarm", "merge", *pods, "--db", main, "--json"]))
    assert m["merged"]["ranges"] == 4 and m["merged"]["seeds"] == 16
    assert _json(RUNNER.invoke(app, ["swarm", "merge", *pods, "--db", main, "--json"]))["merged"]["ranges"] == 0
    (conf,) = _json(RUNNER.invoke(app, ["swarm", "report", "--db", main, "--json"]))["configs"]
    alone = run_range(SwarmConfig(steps=STEPS, bug=BUG).to_json(), 0, 16)
    assert conf["seeds"] == 16 and conf["failed"] == alone["failed"]
    assert sum(f["count"] for f in conf["fingerprints"]) == alone["failed"]
    assert all(f["trace_seed"] == f["smallest_seed"] for f in conf["fingerprints"])
    text = RUNNER.invoke(app, ["swarm", "report", "--db", main])
    assert text.exit_code == 0 and "never hit" in text.output and "fingerprints" in text.output


# ---- Dask ---------------------------------------------------------------------------------------------------

def test_the_same_swarm_runs_on_a_dask_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       scheduler_port=0, silence_logs=40)
    try:
        doc = _json(RUNNER.invoke(app, ["swarm", "--seeds", "16", "--batch", "4", "--steps", str(STEPS), "--bug", BUG,
                                        "--scheduler", cluster.scheduler_address, "--db", str(tmp_path / "d"),
                                        "--json"]))
    finally:
        cluster.close()
    assert doc["executor"].startswith("Dask scheduler") and doc["run"] == 16
    alone = run_range(SwarmConfig(steps=STEPS, bug=BUG).to_json(), 0, 16)
    assert doc["failed"] == alone["failed"] > 0
    assert set(doc["fingerprints_this_run"]) == {f["fingerprint"]["id"] for f in alone["failures"]}
    workers = {r[0] for r in SeedDB(str(tmp_path / "d")).db.execute("SELECT worker FROM ranges")}
    assert len(workers) >= 1 and all(":" in w for w in workers)


# ---- shrinking ----------------------------------------------------------------------------------------------

def test_recorded_decisions_replay_the_seed_exactly():
    cfg = SwarmConfig(steps=800)
    for seed in (3, 4):
        plain = HashSink()
        World(seed, cfg.steps, trace=plain, **cfg.world_kw()).run()
        capsule, _fp, _w = shrink.record(seed, cfg)
        again = HashSink()
        shrink.run_capsule(capsule, trace=again)
        assert again.hexdigest() == plain.hexdigest()
        assert shrink.sizes(capsule)["ops"] > 20


def test_a_planted_bug_shrinks_to_a_much_smaller_capsule_that_replays_to_its_fingerprint(tmp_path):
    bug = "kernel_replay_disabled"
    cfg = SwarmConfig(bug=bug)
    seed = next(s for s in range(10) if swarm.run_one(s, cfg)[1] is not None)
    out = tmp_path / "capsule.json"
    r = RUNNER.invoke(app, ["swarm", "shrink", "--seed", str(seed), "--bug", bug, "--out", str(out), "--json",
                            "--max-seconds", "40"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    before, after = doc["before"], doc["after"]
    assert before["ops"] + before["faults"] >= 3 * (after["ops"] + after["faults"]), doc
    assert after["ops"] >= 1
    capsule = json.loads(out.read_text())
    assert capsule["fingerprint"]["id"] == doc["fingerprint"]["id"]
    replay = RUNNER.invoke(app, ["sim", "--replay", str(out), "--json"])
    assert replay.exit_code == 1, replay.output
    got = json.loads(replay.stdout)
    assert got["same"] is True and got["fingerprint"]["invariant"] == "I12"


def test_ddmin_finds_a_one_minimal_subset():
    calls = []

    def fails(xs):
        calls.append(1)
        return {3, 17, 18} <= set(xs)

    assert sorted(shrink.ddmin(list(range(40)), fails, lambda: False)) == [3, 17, 18]


# ---- probes -------------------------------------------------------------------------------------------------

def test_the_lie_probes_are_the_lie_catalogue():
    """Every lie of the catalogue the simulator tells is one declared probe, and it tells every lie but those
    about the transport itself (the live attack's business)."""
    told = {lies.probe_name(x) for x in lies.TOLD_LIES}
    assert len(told) == len(lies.TOLD_LIES) > 150
    assert {n for n in probes.PROBES if n.startswith("lie.")} == told
    untold = [x for x in CAT.LIES if not lies.told(x)]
    assert all(x.via not in lies.TOLD or x.expect.describe() == "no reply" for x in untold), untold
    assert len(untold) < 15


def test_a_sweep_hits_the_cores_probes_and_nothing_undeclared():
    out = run_range(SwarmConfig(steps=1500).to_json(), 0, 30)
    hit = out["probes"]
    assert probes.undeclared(hit) == []
    for name in ("mm.recovery.map.undone", "mm.journal.compacted", "mm.kernel.lost", "mm.kernel.back",
                 "kernel.reclaim.frames", "mm.watermark.donate", "mm.offer.accepted", "kernel.lease_expired",
                 "fault.mm_crash.commit", "crash.commit", "net.lost", "sim.liveness"):
        assert hit.get(name, [0])[0] > 0, name
    assert 0 < len(probes.never_hit(hit)) < len(probes.PROBES) // 2
    assert all(seeds <= 30 and seeds <= hits for hits, seeds in hit.values())


def test_probes_cost_nothing_without_an_observer():
    """The cores call probe() only when an observer is set: with the default one nothing is called at all."""
    from kernel_server.observe import NO_OBSERVER, KernelObserver
    from mm_service.observe import NO_OBSERVER as MM_NO, MMObserver

    assert KernelObserver.probe is type(NO_OBSERVER).probe and MMObserver.probe is type(MM_NO).probe
    seen = []

    class Loud(KernelObserver):
        def probe(self, name):
            seen.append(name)

    from kernel_server.arch import get_profile
    from kernel_server.bootmap import pc_map
    from kernel_server.core import KernelCore
    from kernel_server.service import KernelService

    p = get_profile("i686")
    mm = "m" * 40
    svc = KernelService(KernelCore(p, pc_map(p, 16 << 20, None), mm, "o" * 40))
    assert not isinstance(svc.call(mm, "reclaim", {"count": 1}), Exception)
    assert seen == []  # no observer: no probe
    svc.set_observer(Loud())
    svc.call(mm, "reclaim", {"count": 1})
    assert seen == ["kernel.reclaim.count"]


# ---- usage errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["swarm", "--seeds", "0"], ["swarm", "--seeds", "3", "--memory", "1MiB"], ["swarm", "--seeds", "3", "--bug", "x"],
    ["swarm", "--seeds", "3", "--mode", "chaos"], ["swarm", "--seeds", "3", "--scheduler", " "],
    ["swarm", "shrink"], ["swarm", "shrink", "--seed", "1", "--fingerprint", "abc"], ["swarm", "merge"],
    ["swarm", "range"], ["sim", "--replay", "/nonexistent/capsule.json"], ["sim", "--replay", "x", "--seed", "3"],
])
def test_usage_errors_are_one_line(args, tmp_path, monkeypatch):
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    r = RUNNER.invoke(app, [*args, *(["--db", str(tmp_path / "db")] if args[0] == "swarm" else [])])
    assert r.exit_code == 2, r.output
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr


def test_report_of_a_missing_database_is_a_usage_error(tmp_path):
    r = RUNNER.invoke(app, ["swarm", "report", "--db", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no seed database" in r.stderr


# ---- the benchmark ------------------------------------------------------------------------------------------

def test_bench_swarm_reports_scaling_as_ratios():
    from bench import swarm as sb

    m = sb.measure(seeds=8, steps=100, batch=2, dask=False)
    assert set(m["pool"]) >= {1} and all(w > 0 and c > 0 for w, c in m["pool"].values())
    rep = sb.report(m)
    keys = {f.key for f in rep.figures}
    assert "swarm.pool.1" in keys
    if m["cores"] > 1:
        scaling = [f for f in rep.figures if f.key.startswith("swarm.scaling.")]
        assert scaling and all(f.ratio > 0 and "cores' worth of CPU" in f.note for f in scaling)


def test_the_kubernetes_manifest_runs_one_range_per_index_into_its_own_database():
    yaml = pytest.importorskip("yaml")
    docs = list(yaml.safe_load_all((pathlib.Path(__file__).parents[1] / "docs/k8s/swarm-job.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "mmsim-swarm")
    assert job["spec"]["completionMode"] == "Indexed"
    (c,) = job["spec"]["template"]["spec"]["containers"]
    cmd = " ".join(c["args"])
    assert "mmsim swarm range" in cmd and "--db /results/pods/pod-$JOB_COMPLETION_INDEX" in cmd
    merge = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "mmsim-swarm-merge")
    assert "mmsim swarm merge /results/pods/pod-* --db /results/main" in " ".join(
        merge["spec"]["template"]["spec"]["containers"][0]["args"])
