"""Placement's quick paths agree with its general ones: ``pick`` and ``pick_one`` (the first block found tier
by tier, a plain loop over few never-whole blocks, one page found in the block's bytes) place exactly where the
documented order (``pick_keys``, lowest free frames first in each block) does, and the one-frame
reference and state updates keep the per-block counts (and their sum, the free count) that a recount of
the frames gives."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kernel_server.service import KernelService
from mm_service import placement
from mm_service import records as J
from mm_service.view import FREE, KERNEL, SCALAR_SPOILT, USED, View
from protocol import runs as R

MM = "M" * 40


def spec_pick(v: View, n: int, owner: int, below: int | None = None) -> np.ndarray | None:
    """``pick`` as its docstring orders it: blocks sorted by ``_pick_keys``, lowest free frames first."""
    B = v.block
    top = v.n if below is None else min(below, v.n)
    bfree = v.bfree[: -(-top // B)]
    if int(bfree.sum()) < n:
        return None
    out, got = [], 0
    for b in np.argsort(placement.pick_keys(v, bfree, owner), kind="stable")[: int(np.count_nonzero(bfree))].tolist():
        f = np.flatnonzero(v.state[b * B:min(b * B + B, top)] == FREE)[: n - got] + b * B
        out.append(f)
        got += f.size
        if got >= n:
            return np.concatenate(out)
    return None


def consistent(v: View) -> None:
    B = v.block
    padded = np.zeros(v.bfree.size * B, dtype=np.uint8)
    padded[: v.n] = v.state
    assert np.array_equal(v.bfree, np.count_nonzero(padded.reshape(-1, B) == FREE, axis=1))
    assert v.free_count() == int(np.count_nonzero(v.state == FREE))
    user = (v.state == FREE) | (v.state == USED)
    assert np.array_equal(v.state[user] == USED, v.refs[user] > 0)


@pytest.mark.parametrize("arch,memory", [("i686", 64 << 20), ("i686-pae", 4 << 30), ("x86_64", 256 << 20)])
def test_quick_placement_and_refcount_paths_agree_with_the_general_ones(arch, memory):
    k = KernelService.boot(arch=arch, memory=memory, mm_key=MM)
    hello = k.call(MM, "hello")
    v = View(k.call(MM, "address_map"), min(hello.get("large_page_sizes") or [4096]) // 4096)
    scalar = len(v.spoilt_list) <= SCALAR_SPOILT  # which first-tier path this profile takes
    assert scalar == (arch != "i686-pae")
    rng = random.Random(arch)
    keys = [f"{i:040d}" for i in range(5)]
    pid, n_intent, picks = 100, 0, 0
    for step in range(500):
        r = rng.random()
        if r < 0.06 or not v.clients:
            pid += 1
            key = rng.choice(keys)
            if key not in v.clients:
                v.apply(J.NewClient(key, pid, 1 << 20, 64))
        elif r < 0.08:
            v.apply(J.ClientGone(rng.choice(list(v.clients))))
        elif r < 0.55:
            key = rng.choice(list(v.clients))
            c = v.clients[key]
            n = rng.choice([1, 1, 1, 1, 2, 5, 40, 900])
            got = placement.pick(v, n, owner=c.tag)
            want = spec_pick(v, n, c.tag)
            assert (got is None) == (want is None) and (got is None or np.array_equal(got, want)), (step, n)
            if n == 1:  # the one-page request's scalar path
                assert placement.pick_one(v, c.tag) == (-1 if want is None else int(want[0])), step
            picks += 1
            if got is not None:
                n_intent += 1
                v.apply(J.Intent(n_intent, "map", key, c.va_next, n, R.from_array(got), 3))
                v.apply(J.Done(n_intent))
        elif r < 0.85:
            c = v.clients[rng.choice(list(v.clients))]
            if c.maps:
                m = c.maps[rng.choice(list(c.maps))]
                n_intent += 1
                v.apply(J.Intent(n_intent, "unmap", c.key, m.vaddr, m.pages, m.frames, m.prot))
                v.apply(J.Done(n_intent))
        elif r < 0.95:  # a donation: the kernel's blocks, below the kernel limit
            n = rng.choice([1, 3, 64])
            got = placement.pick(v, n, owner=0, below=v.kernel_limit)
            want = spec_pick(v, n, 0, below=v.kernel_limit)
            assert (got is None) == (want is None) and (got is None or np.array_equal(got, want)), (step, n)
            if got is not None:
                v.apply(J.Donate(R.from_array(np.sort(got))))
        else:
            kernel = np.flatnonzero(v.state == KERNEL)
            if kernel.size:
                take = np.sort(rng.sample(kernel.tolist(), min(kernel.size, 20)))
                v.apply(J.Reclaim(R.from_array(take)))
        if step % 10 == 0 or v.n < 1 << 20:
            consistent(v)
    assert picks > 100


def test_pick_says_none_when_no_frame_is_free():
    k = KernelService.boot(arch="i686", memory=16 << 20, mm_key=MM)
    v = View(k.call(MM, "address_map"), 1024)
    v.apply(J.NewClient("A" * 40, 1, 1 << 20, 64))
    free = np.flatnonzero(v.state == FREE)
    v.apply(J.Intent(1, "map", "A" * 40, 0x40_0000, int(free.size), R.from_array(free), 3))
    assert v.free_count() == 0
    assert placement.pick(v, 1, owner=1) is None and placement.pick(v, 3, owner=1) is None and spec_pick(v, 1, 1) is None
    assert placement.pick_one(v, 1) == -1


def test_reference_counts_frame_by_frame_agree_with_the_array_path(monkeypatch):
    """Mappings of a few frames change reference counts frame by frame (``View._refs_runs``); the view ends
    exactly as the array path leaves it (counts, states, free counts, block owners), step by step, with
    runs of every shape (one page, one run, several runs, a frame twice) and clients coming and going."""
    from mm_service import view as view_module

    k = KernelService.boot(arch="i686", memory=64 << 20, mm_key=MM)
    amap = k.call(MM, "address_map")
    fast, slow = View(amap, 1024), View(amap, 1024)
    rng = random.Random(7)
    keys = [f"{i:040d}" for i in range(4)]
    n_intent, pid = 0, 0
    free0 = np.flatnonzero(fast.state == FREE)

    def both(rec: J.Record) -> None:
        fast.apply(rec)
        monkeypatch.setattr(view_module, "SCALAR_REFS", 0)
        slow.apply(rec)
        monkeypatch.setattr(view_module, "SCALAR_REFS", 32)

    for step in range(600):
        r = rng.random()
        if r < 0.08 or not fast.clients:
            pid += 1
            key = rng.choice(keys)
            if key not in fast.clients:
                both(J.NewClient(key, pid, 1 << 20, 64))
            continue
        key = rng.choice(list(fast.clients))
        c = fast.clients[key]
        if r < 0.12:
            both(J.ClientGone(key))
        elif r < 0.6:
            n = rng.choice([1, 2, 3, 8, 16, 31, 32, 33, 40])
            start = rng.randrange(0, free0.size - 64)
            shape = rng.random()
            if shape < 0.5:  # one run
                runs = [[int(free0[start]), n]]
            elif shape < 0.9:  # several runs (a placement's pieces)
                frames = sorted(rng.sample(free0[start:start + 64].tolist(), min(n, 64)))
                runs = R.from_array(np.array(frames))
            else:  # a frame twice (what a repair may map)
                f = int(free0[start])
                runs = [[f, 2], [f + 1, 1]]
            n_intent += 1
            both(J.Intent(n_intent, "map", key, c.va_next, sum(cnt for _, cnt in runs), runs, 3))
            both(J.Done(n_intent) if rng.random() < 0.85 else J.Undo(n_intent))
        elif c.maps:
            m = c.maps[rng.choice(list(c.maps))]
            if not m.pending:
                n_intent += 1
                both(J.Intent(n_intent, "unmap", key, m.vaddr, m.pages, m.frames, m.prot))
                both(J.Done(n_intent) if rng.random() < 0.85 else J.Undo(n_intent))
        for name in ("state", "refs", "bfree", "bowner"):
            assert np.array_equal(getattr(fast, name), getattr(slow, name)), (step, name)
        assert fast.free_count() == slow.free_count()
    consistent(fast)


def test_runs_of_a_few_frames_are_those_of_protocol_runs():
    rng = random.Random(3)
    for _ in range(3000):
        n = rng.randrange(0, 80)
        if rng.random() < 0.7:  # ascending, with gaps (what placement picks)
            frames = sorted(rng.sample(range(300), n))
        else:  # any order, repeats
            frames = [rng.randrange(40) for _ in range(n)]
        a = np.array(frames, dtype=np.int64)
        assert placement.runs_of(a) == R.from_array(a), frames
