"""mmsim check: the breadth-first search over every call sequence on a tiny machine finds no violation in
the kernel, finds every planted bug at a small depth with a shortest sequence that replays, covers every
call, and hashes states without the numbers that only name things."""

from __future__ import annotations

import pytest

from kernel_server.calls import CALLS
from kernel_server.conformance import explore as E
from kernel_server.conformance.mutants import BUGS
from kernel_server.invariants import check_kernel
from support import mmsim

# the depth at which each planted bug shows, on the default machine (8 frames, a pool of 2, 2 clients)
DEPTH = {"donate-ignores-refcount": 3, "reclaim-ignores-reservation": 3, "unmap-keeps-reference": 3,
         "map-ignores-quota": 2, "destroy-leaks-threads": 4, "reclaim-partial": 3, "client-maps-user-frames": 4,
         "endpoint-slab-leak": 4}


def test_the_kernel_has_no_violation_to_depth_3():
    res = E.Explorer(E.tiny_machine()).run(3)
    assert res.violation is None and res.depth == 3
    assert res.level_sizes[0] == 1 and all(n > 0 for n in res.level_sizes)
    assert res.states == sum(res.level_sizes) and res.transitions > res.states * 10


def test_the_alphabet_covers_every_call_and_every_role():
    acts = E.alphabet(E.tiny_machine())
    assert set(CALLS) <= {a.call for a in acts}
    assert {"mm", "operator", "stranger", "client-0", "client-1"} <= {a.role for a in acts}
    assert any(dict(a.args).get("large") for a in acts)  # large pages fit the tiny profile
    assert len({a.describe() for a in acts}) == len(acts)


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_every_planted_bug_is_found_at_its_depth_with_a_replayable_shortest_path(bug):
    ex = E.Explorer(E.tiny_machine(), BUGS[bug].core)
    res = ex.run(DEPTH[bug] + 1)
    v = res.violation
    assert v is not None, f"{bug} not found"
    assert v.depth == DEPTH[bug] == len(v.path) == len(v.steps)
    assert res.depth == v.depth - 1  # every shorter sequence was explored first
    svc, lines = ex.replay(v.path)
    assert lines == v.steps
    assert check_kernel(svc.core) or "[I" in lines[-1]  # the end state (or the last call) breaks an invariant


def test_states_are_hashed_without_the_numbers_that_name_things():
    ex = E.Explorer(E.tiny_machine())
    idx = {a.describe(): i for i, a in enumerate(ex.actions)}
    donate = idx["mm: donate(frames=[[4, 2]])"]
    create = idx["mm: proc_create(kernel_quota=4, key=client-0)"]
    destroy = idx["mm: proc_destroy(pid=pid(client-0))"]
    once, _ = ex.replay([donate, create])
    twice, _ = ex.replay([donate, create, destroy, create])
    assert twice.core.by_key != once.core.by_key  # pid 2, not 1
    assert E.state_key(twice.core) == E.state_key(once.core)
    thread = idx["client-0: thread_create()"]
    more, _ = ex.replay([donate, create, thread])
    assert E.state_key(more.core) != E.state_key(once.core)


def test_the_check_command():
    r = mmsim("check", "--depth", "2")
    assert r.returncode == 0 and "no violation" in r.stdout and "depth 2 complete" in r.stdout
    r = mmsim("check", "--bug", "unmap-keeps-reference", "--depth", "4")
    assert r.returncode == 1 and "VIOLATION at depth 3" in r.stdout and "I4" in r.stdout
    replay = r.stdout.split("--replay ")[1].split()[0]
    r2 = mmsim("check", "--bug", "unmap-keeps-reference", "--replay", replay)
    assert r2.returncode == 1 and "violation" in r2.stdout
    assert mmsim("check", "--replay", replay).returncode == 0  # the same calls on the real core: fine
    r = mmsim("check", "--bug", "nope")
    assert r.returncode == 2 and "unknown bug" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = mmsim("check", "--list-bugs")
    assert r.returncode == 0 and all(name in r.stdout for name in BUGS)
