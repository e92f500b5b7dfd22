"""The journal's fast encoder writes exactly the bytes of ``records.encode``, and what is appended comes back.

``Journal.append`` packs records with one ``attrgetter`` per record class (about half the time of
``records.encode``); a journal written either way must read the same, so the bytes are compared for every
record kind with arbitrary field values.
"""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_service import records as J
from mm_service.journal import ENCODERS, Journal

keys = st.text(min_size=1, max_size=40)
ints = st.integers(min_value=0, max_value=(1 << 63) - 1)
runs = st.lists(st.lists(ints, min_size=2, max_size=2), max_size=4)
opt = st.none() | ints
records = st.one_of(
    st.builds(J.NewClient, keys, ints, ints, ints),
    st.builds(J.ClientGone, keys),
    st.builds(J.Intent, ints, st.sampled_from(["map", "unmap"]), keys, ints, ints, runs, ints, st.booleans(), ints,
              st.none() | keys, opt, st.none() | st.binary(max_size=32)),
    st.builds(J.Intent, ints, st.sampled_from(["map", "unmap"]), keys, ints, ints, runs),  # the defaults
    st.builds(J.Done, ints),
    st.builds(J.Undo, ints),
    st.builds(J.Offered, ints, keys, ints, ints, ints, keys, st.none() | keys, opt, st.none() | st.binary(max_size=32)),
    st.builds(J.Donate, runs),
    st.builds(J.Reclaim, runs),
    st.builds(J.EventsRead, ints),
    st.builds(J.Reply, keys, ints, st.binary(max_size=32), st.binary(max_size=64)),
    st.builds(J.Repair, runs, st.integers(0, 3), ints),
    st.builds(J.RepairMapping, keys, ints, st.lists(st.lists(ints, min_size=4, max_size=4), max_size=3)),
    st.builds(J.Snapshot, st.dictionaries(st.text(max_size=8), ints, max_size=4)),
)


def test_every_record_kind_has_a_fast_encoder():
    assert set(ENCODERS) == set(J.TAGS)


@settings(max_examples=300, deadline=None)
@given(records)
def test_the_fast_encoder_writes_the_bytes_of_records_encode(rec):
    packer = msgpack.Packer(use_bin_type=True)
    assert packer.pack(ENCODERS[type(rec)](rec)) == msgpack.packb(J.encode(rec), use_bin_type=True)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(records.filter(lambda r: type(r) is not J.Snapshot), min_size=1, max_size=6), max_size=5))
def test_what_is_appended_is_replayed(tmp_path_factory, batches):
    path = str(tmp_path_factory.mktemp("j") / "mm.db")
    j = Journal(path)
    for batch in batches:
        j.append(batch)
    j.close()
    j = Journal(path)
    try:
        assert list(j.replay()) == [r for batch in batches for r in batch]
    finally:
        j.close()
