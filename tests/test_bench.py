"""Smoke tests of the benchmarks: each runs for a fraction of a second with tiny sizes.

They check the report a user reads (every figure has a floor, a positive finite
ratio and a verdict; the JSON has the documented keys), that the processes a
benchmark starts are gone afterwards, and that bad options are usage errors.
They never check that a target is met: machines are noisy, and targets live in
the benchmark's report, not in timed tests.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from typer.testing import CliRunner

from bench import kernel as kb
from bench import mm as mb
from bench.floor import Floor
from bench.report import Figure, Report
from bench.roundtrip import Rounds, Sample, Stream, cpu_ratio, dealer, rate_ratio
from mmsim.cli import app

FIGURE_KEYS = {"key", "name", "value", "unit", "floor", "ratio", "target", "passed", "verdict"}


def _check_figures(figures: list[dict], expected: set[str]) -> None:
    keys = {f["key"] for f in figures}
    assert expected <= keys, f"missing figures: {expected - keys}"
    for f in figures:
        assert FIGURE_KEYS <= set(f), f
        assert f["verdict"] in ("PASS", "MISS", "info")
        assert isinstance(f["value"], (int, float)) and math.isfinite(f["value"]) and f["value"] > 0, f
        if f["key"] != "largepages.ratio":  # the churn may leave first fit with no large page at all
            assert isinstance(f["ratio"], (int, float)) and math.isfinite(f["ratio"]) and f["ratio"] > 0, f
        assert (f["verdict"] == "info") == (f["passed"] is None)


def _children() -> list[int]:
    """Pids of this process's live (non-zombie) children."""
    me = os.getpid()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            out.append(int(pid))
    return out


def test_kernel_bench_reports_every_figure_and_stops_its_processes(tmp_path):
    before = _children()
    opts = kb.KernelBenchOptions(seconds=0.05, rounds=1, window=4, batch=64, scale_big="128MiB")
    steps: list[str] = []
    rep = kb.run(opts, str(tmp_path), steps.append)
    data = rep.to_json()
    timed = {"kernel.map_unmap", "kernel.map_unmap_pipelined", "kernel.cpu_per_call", "kernel.churn",
             "kernel.churn_pipelined", "kernel.churn_cost", "kernel.ping", "kernel.hello", "kernel.batch.donate",
             "kernel.batch.reclaim", "kernel.batch.map", "kernel.batch.unmap", "kernel.scale"}
    _check_figures(data["figures"], timed | {"kernel.frame_table_bytes", "kernel.boot_16mi"})
    for f in data["figures"]:
        if f["key"] in timed:  # per-round medians: a spread around the ratio, and the conditions said
            lo, hi = f["spread"]
            assert lo <= f["ratio"] <= hi and f["conditions"], f
    assert rep.figure("kernel.frame_table_bytes").value <= 16  # a property of the code, not of timing
    assert rep.figure("kernel.map_unmap").floor_name == "floor"
    assert rep.figure("kernel.cpu_per_call").threshold == 0.80 and rep.figure("kernel.churn_cost").threshold == 0.90
    kernel = data["details"]["kernel"]
    assert kernel["batch_frames"] == 64 and kernel["pages"] == kb.PAGES
    assert set(kernel["floor_replies"]) >= {"map", "unmap", "ping", "hello", "donate", "reclaim"}
    assert len(steps) <= opts.steps() and steps[0].startswith("starting")
    json.dumps(data)  # serialisable as is
    assert _children() == before


def test_mm_bench_reports_every_figure_where_the_cpu_goes_and_a_storm(tmp_path):
    before = _children()
    opts = mb.MMBenchOptions(seconds=0.05, rounds=2, storm="256KiB", chunks=2, clients=3)
    steps: list[str] = []
    rep = mb.run(opts, str(tmp_path), steps.append)
    data = rep.to_json()
    timed = {"mm.alloc_free", "mm.alloc_free_clients", "mm.cpu_per_call", "mm.cpu_per_call_one"}
    _check_figures(data["figures"], timed | {"mm.storm"})
    for f in data["figures"]:
        if f["key"] in timed:  # per-round medians: a spread around the ratio, and the conditions said
            lo, hi = f["spread"]
            assert lo <= f["ratio"] <= hi and f["conditions"], f
    assert rep.figure("mm.alloc_free_clients").threshold == 0.40
    assert rep.figure("mm.alloc_free_clients").floor_name == "floor, 3 in flight"
    assert "3 clients in flight" in rep.figure("mm.cpu_per_call").conditions
    mm = data["details"]["mm"]
    assert set(mm["rounds"]) == set(mb.SIDES) and all(len(r["rates"]) == 2 for r in mm["rounds"].values())
    # where the mm's CPU goes: every stage of the main thread, each kind of thread, for both loads
    assert set(mm["stages"]) == {"3 clients", "one client"}
    for load in mm["stages"].values():
        assert set(load["main_thread_us"]) == {"wait", "receive", "driver", "journal", "send", "other"}
        assert load["main_thread_us"]["driver"] > 0 and load["main_thread_us"]["journal"] > 0
        assert load["threads_us"]["main"] > 0 and load["threads_us"]["zmq_io"] > 0
        assert load["calls"] > 0 and load["calls_per_journal_batch"] > 0
    assert mm["stages"]["one client"]["wakeups_per_call"] >= 1.9  # a call wakes the mm twice: request, kernel reply
    storm = data["details"]["storm"]
    assert storm["pages"] == 64 and storm["seconds"] > 0
    assert storm["mm_counters"]["requests"] >= 64 and storm["mm_counters"]["refused"] == 0
    assert len(steps) <= opts.steps() and steps[0].startswith("starting")
    json.dumps(data)
    assert _children() == before


def test_the_mm_driver_timed_in_process():
    p = mb.profile_driver(clients=4, calls=200, memory="64MiB")
    assert p["calls"] >= 200 and p["clients"] == 4
    assert p["us_per_call"]["driver"] > 0 and p["us_per_call"]["journal"] > 0 and p["us_per_call"]["kernel"] > 0
    assert p["records_per_batch"] >= 1 and p["calls_per_wakeup"] > 1  # the clients' requests overlap


def test_floor_answers_the_shared_loop_in_order(tmp_path):
    import zmq

    ctx = zmq.Context()
    ctx.linger = 0
    try:
        with Floor(str(tmp_path), "tcp") as floor:
            assert floor.endpoint.startswith("tcp://127.0.0.1:")
            s = Stream(dealer(ctx, floor.endpoint, floor.server_key, floor.run_dir, "mm"))
            try:
                one = s.run([("ping", {}), ("stats", {})], 0.05, 1)
                many = s.run([("ping", {})], 0.05, 8)
            finally:
                s.close()
        assert one.calls % 2 == 0 and one.calls >= 2  # whole cycles only
        assert set(one.latencies) == {"ping", "stats"} and many.latencies == {}
        assert one.rate > 0 and many.rate > 0
    finally:
        ctx.term()


def test_the_floor_answers_every_call_with_the_kernels_reply_size(tmp_path):
    """The floor is honest about message sizes: for the benchmark's own requests its replies are exactly
    as long as the kernel's (it answers with the results the kernel gave)."""
    import zmq

    from kernel_server.service import KernelService
    from protocol import wire

    mm = "M" * 40
    svc = KernelService.boot(arch="i686", memory=16 << 20, mm_key=mm, lease_seconds=3600.0)
    pid = svc.call(mm, "proc_create", {"key": "C" * 40, "kernel_quota": 4})["pid"]
    first = next(e["first"] for e in svc.call(mm, "address_map")["entries"] if e["kind"] == "user")
    requests = [*kb.map_unmap_cycle(pid, first, kb.VADDR, 2), ("ping", {}), ("hello", {})]
    replies = {}
    kernel_sizes = []
    for i, (call, args) in enumerate(requests):
        reply = svc.handle(mm, wire.request(1 << 40 | i, call, args), 0.0)
        replies[call] = wire.decode(reply)["result"]
        kernel_sizes.append(len(reply))
    ctx = zmq.Context()
    ctx.linger = 0
    try:
        with Floor(str(tmp_path), "ipc", replies=replies) as floor:
            s = dealer(ctx, floor.endpoint, floor.server_key, floor.run_dir, "mm")
            try:
                floor_sizes = []
                for i, (call, args) in enumerate(requests):
                    s.send(wire.request(1 << 40 | i, call, args))
                    floor_sizes.append(len(s.recv()))
            finally:
                s.close(0)
    finally:
        ctx.term()
    assert floor_sizes == kernel_sizes


def test_ratios_are_medians_of_per_round_ratios():
    """A round in which the floor was disturbed does not make the figure: the ratio is the median of the rounds'
    ratios, each side against the other in the same round (best against best would say 1.5 here)."""
    floor = Rounds([Sample(1000, 1.0, 16, server_cpu=0.010), Sample(500, 1.0, 16, server_cpu=0.010),
                    Sample(1000, 1.0, 16, server_cpu=0.010)])
    kernel = Rounds([Sample(600, 1.0, 16, server_cpu=0.012), Sample(1500, 1.0, 16, server_cpu=0.020),
                     Sample(620, 1.0, 16, server_cpu=0.0124)])
    r = rate_ratio(kernel, floor)
    assert (r.median, r.lo, r.hi, r.n) == (0.62, 0.6, 3.0, 3)
    c = cpu_ratio(kernel, floor)  # floor CPU per echo over kernel CPU per call, round by round
    assert c.n == 3 and abs(c.median - 0.5) < 1e-9 and abs(c.hi - 1.5) < 1e-9


def test_report_verdicts_and_table():
    from rich.console import Console

    rep = Report()
    rep.add(Figure("a", "rate", 90.0, "calls/s", 100.0, "echoes/s", "floor", 0.9, ">=", 0.8, ">= 0.8",
                   spread=(0.85, 0.97), conditions="ipc, 16 in flight; 5 rounds x 0.5 s"))
    rep.add(Figure("b", "latency", 300.0, "us", 100.0, "us", "floor", 3.0, "<=", 2.0, "<= 2"))
    rep.add(Figure("c", "storm", 5.0, "us", ratio=float("inf"), op=">=", threshold=1.0))
    rep.add(Figure("d", "info", 5.0, "us"))
    assert [f.verdict for f in rep.figures] == ["PASS", "MISS", "MISS", "info"]
    assert rep.to_json()["missed"] == ["b", "c"]
    with open(os.devnull, "w") as sink:
        console = Console(width=160, record=True, file=sink)
        rep.render(console)
    text = console.export_text()
    assert "PASS" in text and "MISS" in text and "echoes/s" in text
    assert "0.85..0.97" in text and "16 in flight" in text
    assert rep.to_json()["figures"][0]["spread"] == [0.85, 0.97]


runner = CliRunner()


def test_cli_kernel_json_and_largepages_table(tmp_path):
    r = runner.invoke(app, ["bench", "kernel", "--seconds", "0.05", "--rounds", "1", "--window", "4",
                            "--no-scale", "--json", "--run-dir", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {"meta", "figures", "details", "missed"} <= set(data)
    assert data["meta"]["transport"] == "ipc"
    _check_figures(data["figures"], {"kernel.map_unmap", "kernel.batch.map"})
    assert not any(f["key"] == "kernel.scale" for f in data["figures"])

    r = runner.invoke(app, ["bench", "largepages", "--steps", "200", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "pageblock" in r.stdout and "first fit" in r.stdout


def test_cli_sim_reports_each_way_of_checking_and_detection():
    from simulator import mutants

    r = runner.invoke(app, ["bench", "sim", "--seconds", "0.5", "--detect-seeds", "1", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    keys = {f["key"] for f in data["figures"]}
    checking = {"sim.full_every_step", "sim.incremental_every_step_full_every_500_steps",
                "sim.incremental_every_step_full_at_quiet_points", "sim.none_between_quiet_points"}
    detect = {f"sim.detect.{bug}" for bug in mutants.BUGS} | {"sim.detect.total"}
    assert keys == checking | detect
    _check_figures(data["figures"], checking)
    assert data["details"]["sim"]["target_ops_per_s"] == 20_000
    det = data["details"]["sim"]["detection"]["unmap_forgets_decrement"]
    assert det["swarm"] == det["fixed"] == {"first": 1, "found": 1, "seeds": 1, "per_find": 1.0}  # seed 0, both ways
    by_key = {f["key"]: f for f in data["figures"]}
    assert by_key["sim.detect.unmap_forgets_decrement"]["value"] == 1
    assert by_key["sim.detect.total"]["verdict"] == "info"


def test_cli_hot_times_each_in_process_path_and_the_module_refuses_bad_arguments():
    from bench import hot

    r = runner.invoke(app, ["bench", "hot", "--calls", "200", "--passes", "1", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    _check_figures(data["figures"], {f"hot.{part}" for part in hot.PARTS})
    by_key = {f["key"]: f for f in data["figures"]}
    assert by_key["hot.kernel"]["ratio"] == 1.0
    assert by_key["hot.driver16"]["value"] > by_key["hot.kernel"]["value"]  # (an mm call does more than a kernel map)
    assert data["details"]["hot"]["driver16"]["kernel_us_per_call"] > 0
    assert hot.main(["no-such-part"]) == 2 and hot.main(["kernel", "-1"]) == 2 and hot.main([]) == 2
    assert hot.main(["kernel", "100"]) == 0


@pytest.mark.parametrize("args", [
    ["bench", "hot", "--calls", "5"],
    ["bench", "sim", "--seconds", "0"],
    ["bench", "kernel", "--transport", "udp"],
    ["bench", "mm", "--storm", "lots"],
    ["bench", "mm", "--clients", "0"],
    ["bench", "all", "--seconds", "0"],
    ["bench", "kernel", "--rounds", "0"],
])
def test_cli_bad_options_are_usage_errors(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output


def test_the_shared_serving_loop_answers_drains_refuses_and_times_out(tmp_path):
    """serving.Loop (the kernel's loop and the floor's): each request gets its handler's reply, in order; with
    drain, what has already arrived is answered in the same turn; a message of two parts is refused (EPROTO)
    and reported; a turn with nothing to read returns 0 by its deadline."""
    import time

    import zmq

    from protocol import rundir, serving, wire

    rundir.init(str(tmp_path), clients=0)
    ctx = zmq.Context()
    ctx.linger = 0
    pub, sec = rundir.load_keypair(str(tmp_path), "kernel")
    sock, auth, endpoint = serving.bind_router(ctx, "tcp://127.0.0.1:*", pub, sec, "test")
    refused = []
    seen = []

    def handle(identity, data):
        seen.append(identity)
        return data[::-1]

    try:
        c = dealer(ctx, endpoint, pub, str(tmp_path), "mm")
        for drain, sends in ((0, [b"one"]), (8, [b"a1", b"b2", b"c3"])):
            loop = serving.Loop(sock, handle, drain=drain, on_refused=lambda who, err: refused.append(err))
            for m in sends:
                c.send(m)
            time.sleep(0.2)  # (all of them queued at the server)
            assert loop.turn(time.monotonic() + 5) == len(sends)
            assert [c.recv() for _ in sends] == [m[::-1] for m in sends]
        assert seen and set(seen) == {rundir.public_key(str(tmp_path), "mm").decode()}  # the caller's CURVE key
        c.send_multipart([b"x", b"y"])
        assert loop.turn(time.monotonic() + 5) == 1
        reply = wire.decode(c.recv())
        assert reply["ok"] is False and reply["error"]["code"] == "EPROTO" and refused[0].code.name == "EPROTO"
        t0 = time.monotonic()
        assert loop.turn(t0 + 0.05) == 0 and time.monotonic() - t0 < 1.0
        c.close(0)
    finally:
        sock.close(0)
        auth.stop()
        ctx.term()
