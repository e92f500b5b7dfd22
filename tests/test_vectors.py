"""The kernel test vectors (tests/vectors): the repository copy is exactly what the exporter writes, every
vector passes against the model's core (a fresh kernel per test, and one kernel reset by calls between
tests) and against a real kernel process, a kernel with a planted bug fails them, every rule of every
call is covered alone and in a pair, and the digest is what the schema says."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct

import numpy as np
import pytest

from kernel_server.calls import CALLS, COMMON
from kernel_server.conformance import digest as D
from kernel_server.conformance import replay as rp
from kernel_server.conformance.cases import Runner, role_for
from kernel_server.conformance.export import FILES, export
from kernel_server.conformance.mutants import BUGS
from kernel_server.conformance.walks import hypothesis_version
from support import mmsim

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, "vectors")


@pytest.fixture(scope="module")
def tests():
    return rp.load(VECTORS)


def _without_walks(text: str) -> dict:
    doc = json.loads(text)
    doc["testGroups"] = [g for g in doc["testGroups"] if g["group"] != "walk"]
    doc.pop("numberOfTests")
    doc["generator"].pop("hypothesis")
    return doc


def test_the_repository_copy_is_what_the_exporter_writes(tmp_path):
    """Drift: regenerate into a temporary directory and compare byte for byte (walks only under the version
    of hypothesis that drew them; under another, everything else is compared and the walks must still pass)."""
    s = export(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(FILES) == sorted(os.listdir(VECTORS))
    with open(os.path.join(VECTORS, "i686.json")) as f:
        recorded = json.load(f)["generator"]["hypothesis"]
    same = recorded == hypothesis_version()
    for name in FILES:
        with open(os.path.join(VECTORS, name), "rb") as f:
            old = f.read()
        with open(os.path.join(tmp_path, name), "rb") as f:
            new = f.read()
        if same or not name.endswith(".json") or name == "schema.json":
            assert new == old, (f"tests/vectors/{name} differs from what the exporter writes now: run "
                                "`mmsim vectors export tests/vectors` and commit the result")
        else:
            assert _without_walks(new.decode()) == _without_walks(old.decode()), name
    assert 2 << 20 < sum(s["bytes"].values()) < 4 << 20  # a few MB: small boot maps


def test_every_vector_passes_against_the_core_fresh_and_reset_by_calls(tests):
    fresh = rp.summary(rp.run_in_process(tests))
    assert fresh["failed"] == 0 and fresh["passed"] == len(tests), fresh["groups"]
    shared = rp.summary(rp.run_in_process(tests, shared=True))  # resets, id translation
    assert shared["failed"] == 0, [g["failures"][:2] for g in shared["groups"] if g["failed"]]


@pytest.mark.parametrize("bug", ["donate-ignores-refcount", "reclaim-ignores-reservation", "unmap-keeps-reference",
                                 "client-maps-user-frames"])
def test_a_kernel_with_a_planted_bug_fails_them(tests, bug):
    i686 = [t for t in tests if t.profile == "i686"]
    report = rp.summary(rp.run_in_process(i686, core=BUGS[bug].core))
    assert report["failed"] > 0
    why = [f["why"] for g in report["groups"] for f in g["failures"]]
    assert all(w.startswith("step ") for w in why)


def test_a_kernel_process_passes_them(tests):
    """The multi-process replay: a kernel process per boot map booted with --boot-map, the tests of a few
    groups of every profile on it, reset by calls between tests."""
    pick = [t for t in tests if t.group in ("reclaim", "unmap", "quota", "large-pages", "donate-reclaim")]
    pick += [t for t in tests if t.group == "walk"][:6]
    pick += [t for t in tests if t.id == "donate/i686-pae/above-4gib"]
    report = rp.summary(rp.run_spawned(pick))
    assert report["failed"] == 0 and report["passed"] == len(pick), [g["failures"][:2] for g in report["groups"]]


def test_every_rule_is_broken_alone_and_together_with_a_later_one(tests):
    alone: set[tuple[str, str]] = set()
    paired: set[tuple[str, str]] = set()
    for t in tests:
        flags = t.data["flags"]
        rules = [f[5:].split(".") for f in flags if f.startswith("rule:")]
        for call, rule in rules:
            (paired if "precedence" in flags else alone).add((call, rule))
    not_at_call_level = {"envelope", "unauthenticated"}  # below the call: the protocol's own tests
    no_case = {("map", "no_large_pages")}  # every profile has large pages
    no_pair = {("proc_create", "quota_below_cost")}  # its one later rule (pool) is broken by the same argument
    missing_alone, missing_pair = [], []
    for name, spec in CALLS.items():
        order = [r.name for r in COMMON + spec.rules]
        for rule in spec.rules:
            if (name, rule.name) in no_case:
                continue
            if (name, rule.name) not in alone:
                missing_alone.append((name, rule.name))
            if rule.name != order[-1] and (name, rule.name) not in paired | no_pair:
                missing_pair.append((name, rule.name))
    assert not missing_alone, missing_alone
    assert not missing_pair, missing_pair
    common = {r for _c, r in alone} & {r.name for r in COMMON}
    assert common == {r.name for r in COMMON} - not_at_call_level


def test_the_vectors_cover_every_call_profile_and_the_design_scenarios(tests):
    calls = {s["call"] for t in tests for s in t.data["steps"]}
    assert set(CALLS) <= calls
    assert {t.profile for t in tests} == {"i686", "i686-pae", "x86_64"}
    flags = {f for t in tests for f in t.data["flags"]}
    assert {"empty_pool", "quota", "reservation", "large_pages", "walk", "precedence"} <= flags
    for t in tests:  # steps after a digest-less one do not exist
        digests = [s["digest"] for s in t.data["steps"]]
        assert None not in digests[:-1], t.id
    assert sum(1 for t in tests if t.group == "walk") >= 30


def _snapshot_state():
    """A state with the mm's and a client's mappings, a large page, threads and endpoints."""
    from kernel_server.bootmap import pc_map
    from kernel_server.arch import get_profile
    from kernel_server.conformance.cases import Step

    bm = pc_map(get_profile("x86_64"), 16 << 20, 32)
    r = Runner("x86_64", bm)
    for s in [Step("mm", "proc_create", {"key": {"$key": "client-0"}, "kernel_quota": 12}),
              Step("mm", "proc_create", {"key": {"$key": "client-1"}, "kernel_quota": 12}),
              Step("mm", "map", {"pid": 1, "vaddr": 1 << 28, "frames": [[500, 3], [510, 1]], "prot": 3}),
              Step("mm", "map", {"pid": 2, "vaddr": 1 << 28, "frames": [[500, 1]], "prot": 1}),
              Step("client-0", "map", {"vaddr": (1 << 28) + (8 << 12), "frames": [[256, 2]], "prot": 1}),
              Step("mm", "map", {"pid": 1, "vaddr": 1 << 30, "frames": [[1024, 512]], "prot": 1, "large": True}),
              Step("client-0", "thread_create"), Step("client-1", "endpoint_create")]:
        _args, out = r.run(s)
        assert isinstance(out, dict), out
    return r


def test_the_digest_from_the_wire_is_the_digest_from_the_core():
    r = _snapshot_state()
    k = rp.ServiceKernel.__new__(rp.ServiceKernel)
    k.svc, k.req = r.svc, 100

    def read(name, args):
        out = k.call("operator", name, args)
        assert isinstance(out, dict), out
        return out

    wire = D.from_reads(read, role_for, r.core.profile.user_top)
    core = D.from_core(r.core, role_for)
    assert wire.digest() == core.digest()
    assert [len(p["mappings"]) for p in core.procs] == [4 + 2 + 1, 1]  # pages, the client's 2, one large page


def test_the_digest_is_the_documented_byte_layout():
    s = D.Snapshot(3, {c: i + 1 for i, c in enumerate(D.COUNTS)}, np.array([0, 1, 3], dtype=np.uint8),
                   np.array([0, 0, 2], dtype=np.uint32),
                   [{"pid": 7, "role": "client-0", "kernel_used": 3, "kernel_limit": 9, "user_quota": 0, "tables": 1,
                     "threads": 1, "endpoints": 0, "mappings": [(0x2000, 2, 4096, 1, 0), (0x1000, 2, 4096, 3, 1)]}])
    want = (b"mmsim-state-1\n" + struct.pack("<II", 3, 1) + struct.pack("<7Q", 1, 2, 3, 4, 5, 6, 7)
            + bytes([0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 3, 2, 0, 0, 0])
            + struct.pack("<QB", 7, 8) + b"client-0" + struct.pack("<7Q", 3, 9, 0, 1, 1, 0, 2)
            + struct.pack("<QQQBB", 0x1000, 2, 4096, 3, 1) + struct.pack("<QQQBB", 0x2000, 2, 4096, 1, 0))
    assert D.layout(s) == want
    assert s.digest() == hashlib.sha256(want).hexdigest()


def test_a_changed_expectation_fails_with_the_step_named(tests):
    t = copy.deepcopy(next(x for x in tests if x.id == "donate/i686/mm/mapped"))
    t.data["steps"][-1]["expect"]["details"]["frames"] = [[1, 1]]
    (o,) = rp.run_in_process([t])
    assert not o.passed and o.failure.startswith("step 8 mm donate: got")
    t = copy.deepcopy(next(x for x in tests if x.id == "donate/i686/mm/ok"))
    t.data["steps"][-1]["digest"] = "0" * 64
    (o,) = rp.run_in_process([t])
    assert not o.passed and "state digest" in o.failure


def test_the_vectors_command(tmp_path):
    r = mmsim("vectors", "run", VECTORS, "--in-process", "--group", "thread_create", "--profile", "i686")
    assert r.returncode == 0, r.stderr
    assert "thread_create" in r.stdout and "0 failed" in r.stdout
    bad = tmp_path / "v"
    bad.mkdir()
    with open(os.path.join(VECTORS, "i686.json")) as f:
        doc = json.load(f)
    doc["testGroups"] = [g for g in doc["testGroups"] if g["group"] == "ping"]
    doc["testGroups"][0]["tests"][0]["steps"][-1]["expect"] = {"ok": True, "result": {"pid": 5}}
    (bad / "i686.json").write_text(json.dumps(doc))
    r = mmsim("vectors", "run", str(bad), "--in-process", "--json")
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["failed"] == 1 and report["groups"][0]["failures"][0]["id"].startswith("ping/")
    r = mmsim("vectors", "run", VECTORS)
    assert r.returncode == 2 and "choose one of --kernel" in r.stderr


def test_the_kernel_boots_from_a_boot_map_file_and_refuses_a_bad_one(tmp_path):
    from kernel_server.arch import PROFILES
    from kernel_server.bootmap import from_json

    arch, bm = from_json({"arch": "i686-pae", "regions": [["reserved", 0, 1], ["user", 1, 1023]]}, PROFILES)
    assert arch == "i686-pae" and bm.span == 1024
    for bad, words in [({"arch": "i686"}, "a boot map is"), ({"arch": "arm", "regions": [["user", 0, 1]]}, "arm"),
                       ({"arch": "i686", "regions": [["user", 4, 4], ["user", 2, 1]]}, "in order"),
                       ({"arch": "i686", "regions": [["ram", 0, 1]]}, "kind one of")]:
        with pytest.raises(ValueError, match=words):
            from_json(bad, PROFILES)
    f = tmp_path / "bm.json"
    f.write_text(json.dumps({"arch": "i686", "regions": [["user", 0, 0]]}))
    r = mmsim("kernel", "--boot-map", str(f), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "--boot-map" in r.stderr and "at least one frame" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
