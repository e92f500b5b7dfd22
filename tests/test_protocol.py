"""The wire contract: envelope parsing and limits, strict call validation, frame
runs, error values on the wire, the replay cache, and the error table of
docs/design.md section 5."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import runs as R
from protocol import wire
from kernel_server.calls import ADAPTERS as KERNEL_CALLS
from protocol.calls import MAX_FRAME, MAX_FRAMES_PER_CALL, MM_CALLS, validate
from protocol.errors import CallError, Errno, Error
from protocol.replay import ReplayCache

KEY = "K" * 40

# docs/design.md section 5: Jinue's errno.h, plus our EEXIST.
SPEC_ERRNO = {
    "ENOMEM": 1, "ENOSYS": 2, "EINVAL": 3, "EAGAIN": 4, "EBADF": 5, "EIO": 6, "EPERM": 7, "E2BIG": 8,
    "ENOMSG": 9, "ENOTSUP": 10, "EBUSY": 11, "ESRCH": 12, "EDEADLK": 13, "EPROTO": 14, "EEXIST": 15,
}
# docs/design.md section 5: the kernel calls (names are the contract).
SPEC_KERNEL_CALLS = {
    "hello", "address_map", "proc_create", "proc_destroy", "donate", "reclaim", "map", "unmap",
    "thread_create", "thread_destroy", "endpoint_create", "endpoint_destroy", "frame_info", "mappings", "stats",
    "ping",
}
SPEC_MM_CALLS = {"alloc", "free", "share", "accept", "stats"}


def parse_error(data: bytes) -> tuple[int | None, Error]:
    out = wire.parse_request(data)
    assert len(out) == 2, f"expected an error, got {out!r}"
    req_id, err = out
    assert isinstance(err, Error)
    return req_id, err


def env(**fields) -> bytes:
    base = {"v": 1, "id": 1, "call": "ping", "args": {}}
    base.update(fields)
    return wire.encode({k: v for k, v in base.items() if v is not DROP})


DROP = object()


# ---- error table ------------------------------------------------------------

def test_error_names_and_numbers_match_the_design():
    assert {e.name: int(e) for e in Errno} == SPEC_ERRNO


def test_call_names_match_the_design():
    assert SPEC_KERNEL_CALLS <= set(KERNEL_CALLS)
    assert SPEC_MM_CALLS <= set(MM_CALLS)


# ---- envelope -----------------------------------------------------------------

def test_well_formed_request_parses():
    assert wire.parse_request(wire.request(7, "ping")) == (7, "ping", {})
    assert wire.parse_request(wire.request(wire.MAX_ID, "map", {"vaddr": 0})) == (wire.MAX_ID, "map", {"vaddr": 0})
    assert wire.parse_request(env(id=0)) == (0, "ping", {})


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x91", b"\xde\x00\x01\x91\xc0\x01", b"\x91" * 2_000 + b"\xc0",
                                  b"\xa5abc"])
def test_garbage_bytes_are_eproto(data):
    req_id, err = parse_error(data)
    assert req_id is None and err.code == Errno.EPROTO


@given(st.binary(max_size=256))
def test_no_bytes_make_the_parser_raise(data):
    out = wire.parse_request(data)
    if len(out) == 2:
        assert out[1].code in (Errno.EPROTO, Errno.E2BIG)
    else:
        req_id, call, args = out
        assert type(req_id) is int and type(call) is str and type(args) is dict


@pytest.mark.parametrize("value", [[1, 2], "ping", 5, None, b"\x01"])
def test_non_map_request_is_eproto(value):
    req_id, err = parse_error(wire.encode(value))
    assert req_id is None and err.code == Errno.EPROTO and "map" in err.message


@pytest.mark.parametrize("bad_id", ["1", -1, -(1 << 63), True, 1.0, None, [1], DROP])
def test_bad_request_id_is_eproto_naming_id(bad_id):
    req_id, err = parse_error(env(id=bad_id))
    assert req_id is None and err.code == Errno.EPROTO and "'id'" in err.message


def test_unknown_envelope_fields_are_named():
    req_id, err = parse_error(wire.encode({"v": 1, "id": 3, "call": "ping", "args": {}, "sudo": True}))
    assert req_id == 3 and err.code == Errno.EPROTO and "sudo" in err.message


@pytest.mark.parametrize("v", [2, 0, True, "1", 1.0, None, DROP])
def test_wrong_version_is_eproto(v):
    req_id, err = parse_error(env(v=v))
    assert req_id == 1 and err.code == Errno.EPROTO and "'v'" in err.message


@pytest.mark.parametrize("call", ["", "x" * (wire.MAX_CALL_NAME + 1), 5, None, b"ping", DROP])
def test_bad_call_name_is_eproto(call):
    req_id, err = parse_error(env(call=call))
    assert req_id == 1 and err.code == Errno.EPROTO and "'call'" in err.message


@pytest.mark.parametrize("args", [[], "x", 1, None])
def test_args_must_be_a_map(args):
    req_id, err = parse_error(env(args=args))
    assert err.code == Errno.EPROTO and "'args'" in err.message


def test_missing_args_means_empty():
    assert wire.parse_request(env(args=DROP)) == (1, "ping", {})


def test_oversized_message_is_e2big():
    data = env(args={"pad": b"x" * wire.MAX_REQUEST_BYTES})
    req_id, err = parse_error(data)
    assert err.code == Errno.E2BIG and str(len(data)) in err.message
    # the largest legal request (every run of the most frames, with the largest numbers) fits, and parses
    largest = wire.request(wire.MAX_ID, "donate", {"frames": [[MAX_FRAME - MAX_FRAMES_PER_CALL, MAX_FRAMES_PER_CALL]]
                                                   * wire.MAX_RUNS})
    assert len(largest) <= wire.MAX_REQUEST_BYTES and len(wire.parse_request(largest)) == 3


@pytest.mark.parametrize("args, limit", [
    ({"frames": [[1, 1]] * (wire.MAX_RUNS + 1)}, "max_array_len"),
    ({f"k{i}": 1 for i in range(wire.MAX_MAP + 1)}, "max_map_len"),
    ({"key": "K" * (wire.MAX_STR + 1)}, "max_str_len"),
    ({"key": b"K" * (wire.MAX_STR + 1)}, "max_bin_len"),
])
def test_containers_beyond_the_limits_are_e2big_before_anything_is_built(args, limit):
    data = wire.request(3, "donate", args)
    assert len(data) <= wire.MAX_REQUEST_BYTES  # small enough: refused for its shape, not its size
    req_id, err = parse_error(data)
    assert req_id is None and err.code == Errno.E2BIG and limit in err.message
    at_limit = {k: (v[:-1] if isinstance(v, (list, str, bytes)) else v) for k, v in list(args.items())[:wire.MAX_MAP]}
    assert len(wire.parse_request(wire.request(3, "donate", at_limit))) == 3


def test_replies_round_trip():
    ok = wire.parse_reply(wire.ok_reply(9, {"pid": 3}))
    assert ok == {"v": 1, "id": 9, "ok": True, "result": {"pid": 3}}
    err = Error(Errno.EBUSY, "frame 5 is mapped", {"frames": [[5, 1]]})
    bad = wire.parse_reply(wire.error_reply(None, err))
    assert bad["ok"] is False and bad["id"] is None
    assert Error.from_wire(bad["error"]) == err
    with pytest.raises(ValueError):
        wire.parse_reply(wire.encode([1]))
    with pytest.raises(ValueError):
        wire.parse_reply(wire.encode({"id": 1}))


# ---- strict validation ---------------------------------------------------------

def invalid(call: str, args: dict, table=KERNEL_CALLS) -> Error:
    out = validate(table, call, args)
    assert isinstance(out, Error), f"{call} {args} was accepted: {out!r}"
    assert out.code == Errno.EINVAL
    return out


def test_valid_args_give_models():
    m = validate(KERNEL_CALLS, "map", {"pid": 2, "vaddr": 4096, "frames": [[10, 2]], "prot": 3})
    assert (m.pid, m.vaddr, m.frames, m.prot, m.large, m.page_size) == (2, 4096, [[10, 2]], 3, False, None)
    assert validate(KERNEL_CALLS, "reclaim", {"count": 4}).count == 4
    assert validate(MM_CALLS, "alloc", {"pages": 1, "prot": 1}).pages == 1


@pytest.mark.parametrize("value", ["1", 1.0, True, b"1", None, [1]])
def test_no_coercion_for_integers(value):
    err = invalid("unmap", {"vaddr": 0, "pages": value})
    assert err.details["field"] == "pages" and "args.pages" in err.message


def test_bool_is_not_an_int_anywhere_it_matters():
    assert invalid("donate", {"frames": [[True, 1]]}).details["field"] == "frames.0.0"
    assert invalid("donate", {"frames": [[5, True]]}).details["field"] == "frames.0.1"
    assert invalid("map", {"pid": True, "vaddr": 0, "frames": [[5, 1]], "prot": 1}).details["field"] == "pid"
    assert invalid("map", {"vaddr": 0, "frames": [[5, 1]], "prot": True}).details["field"] == "prot"
    assert invalid("reclaim", {"count": True}).details["field"] == "count"
    assert invalid("thread_destroy", {"tid": True}).details["field"] == "tid"


def test_no_coercion_for_bools_and_strings():
    assert invalid("map", {"vaddr": 0, "frames": [[5, 1]], "prot": 1, "large": 1}).details["field"] == "large"
    assert invalid("map", {"vaddr": 0, "frames": [[5, 1]], "prot": 1, "large": "true"}).details["field"] == "large"
    assert invalid("proc_create", {"key": b"K" * 40}).details["field"] == "key"


@pytest.mark.parametrize("call, args", [
    ("ping", {"x": 1}),
    ("hello", {"verbose": True}),
    ("donate", {"frames": [[1, 1]], "force": True}),
    ("map", {"vaddr": 0, "frames": [[1, 1]], "prot": 1, "cache": 0}),
])
def test_unknown_fields_are_refused_by_name(call, args):
    extra = (set(args) - {"frames", "vaddr", "prot"}).pop()
    err = invalid(call, args)
    assert err.details["field"] == extra and extra in err.message


def test_missing_fields_are_named():
    err = invalid("map", {"vaddr": 0, "prot": 1})
    assert err.details["field"] == "frames" and "frames" in err.message


@pytest.mark.parametrize("frames, field", [
    ([], "frames"),
    ([[1, 0]], "frames"),
    ([[1]], "frames.0"),
    ([[1, 2, 3]], "frames.0"),
    ([[-1, 1]], "frames.0.0"),
    ([[MAX_FRAME + 1, 1]], "frames.0.0"),
    ([[MAX_FRAME, 2]], "frames"),
    ([[0, MAX_FRAMES_PER_CALL], [MAX_FRAMES_PER_CALL, 1]], "frames"),
    ([[1, 1]] * (wire.MAX_RUNS + 1), "frames"),
    ({"1": 1}, "frames"),
])
def test_bad_runs_are_refused(frames, field):
    assert invalid("donate", {"frames": frames}).details["field"] == field


def test_limits_at_the_edge_are_accepted():
    assert not isinstance(validate(KERNEL_CALLS, "donate", {"frames": [[1, 1]] * wire.MAX_RUNS}), Error)
    assert not isinstance(validate(KERNEL_CALLS, "donate", {"frames": [[0, MAX_FRAMES_PER_CALL]]}), Error)
    assert not isinstance(validate(KERNEL_CALLS, "donate", {"frames": [[MAX_FRAME, 1]]}), Error)


def test_reclaim_takes_exactly_one_of_count_or_frames():
    assert "exactly one" in invalid("reclaim", {}).message
    assert "exactly one" in invalid("reclaim", {"count": 1, "frames": [[1, 1]]}).message
    assert invalid("reclaim", {"count": 0}).details["field"] == "count"


def test_prot_and_key_ranges():
    assert invalid("map", {"vaddr": 0, "frames": [[1, 1]], "prot": 0}).details["field"] == "prot"
    assert invalid("map", {"vaddr": 0, "frames": [[1, 1]], "prot": 8}).details["field"] == "prot"
    assert invalid("proc_create", {"key": "K" * 39}).details["field"] == "key"
    assert invalid("proc_create", {"key": "K" * 39 + "\n"}).details["field"] == "key"
    assert invalid("share", {"vaddr": 0, "pages": 1, "peer": "short", "peer_vaddr": 0}, MM_CALLS).details["field"] == "peer"


def test_unknown_call_is_enosys():
    out = validate(KERNEL_CALLS, "format_disk", {})
    assert isinstance(out, Error) and out.code == Errno.ENOSYS and "format_disk" in out.message
    assert validate(MM_CALLS, "donate", {"frames": [[1, 1]]}).code == Errno.ENOSYS


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=4), st.booleans(),
                                                       st.none(), st.lists(st.integers(), max_size=3)),
                       max_size=4),
       st.sampled_from(sorted(KERNEL_CALLS)))
def test_validate_never_raises(args, call):
    out = validate(KERNEL_CALLS, call, args)
    if isinstance(out, Error):
        assert out.code == Errno.EINVAL and out.details.get("field")


# ---- runs -----------------------------------------------------------------------

@given(st.lists(st.integers(min_value=0, max_value=300), max_size=60))
def test_runs_round_trip_in_order(frames):
    runs = R.from_array(frames)
    assert R.to_array(runs).tolist() == frames
    assert R.total(runs) == len(frames)
    # maximal: no run continues straight into the next
    for (f1, c1), (f2, _c2) in zip(runs, runs[1:]):
        assert f1 + c1 != f2
    assert all(c >= 1 for _, c in runs)


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=12))
def test_normalize_gives_sorted_distinct_merged_runs(pairs):
    runs = [list(p) for p in pairs]
    norm = R.normalize(runs)
    expect = sorted({f for first, count in runs for f in range(first, first + count)})
    assert R.to_array(norm).tolist() == expect
    for (f1, c1), (f2, _c2) in zip(norm, norm[1:]):
        assert f1 + c1 < f2


def test_runs_of_a_large_range_stay_small():
    runs = R.from_array(np.arange(1 << 18, 1 << 19))
    assert runs == [[1 << 18, 1 << 18]]
    assert R.from_array([]) == [] and R.to_array([]).size == 0


# ---- errors on the wire ------------------------------------------------------------

details_st = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda k: k not in ("code", "errno", "message")),
    st.one_of(st.integers(-(1 << 63), (1 << 64) - 1), st.text(max_size=10),
              st.lists(st.lists(st.integers(0, 1 << 40), min_size=2, max_size=2), max_size=3)),
    max_size=3,
)


@given(st.sampled_from(list(Errno)), st.text(max_size=40), details_st)
def test_error_wire_round_trip(code, message, details):
    err = Error(code, message, details)
    wired = err.to_wire()
    assert wired["code"] == code.name and wired["errno"] == int(code) and wired["message"] == message
    assert Error.from_wire(wired) == err
    assert Error.from_wire(msgpack.unpackb(msgpack.packb(wired))) == err


def test_error_details_cannot_overwrite_the_code():
    wired = Error(Errno.EBUSY, "m", {"code": "ENOMEM", "errno": 1, "message": "x", "frames": [[1, 1]]}).to_wire()
    assert wired == {"code": "EBUSY", "errno": 11, "message": "m", "frames": [[1, 1]]}


@pytest.mark.parametrize("garbage", [None, 5, "EBUSY", [1], {"code": "EWHAT", "message": "m"}, {}])
def test_malformed_wire_error_becomes_eproto(garbage):
    assert Error.from_wire(garbage).code == Errno.EPROTO


def test_call_error_carries_the_value():
    e = CallError(Error(Errno.ENOMEM, "map needs 2 kernel frame(s), 1 free", {"needed": 2, "available": 1}), "map")
    assert (e.code, e.name, e.errno, e.details) == (Errno.ENOMEM, "ENOMEM", 1, {"needed": 2, "available": 1})
    assert str(e) == "map: ENOMEM (1): map needs 2 kernel frame(s), 1 free"


# ---- replay cache -----------------------------------------------------------------

def test_replay_same_id_same_bytes_is_the_cached_reply():
    c = ReplayCache()
    req = wire.request(1, "thread_create")
    d = c.digest(req)
    assert c.lookup("A", 1, d) is None
    c.remember("A", 1, d, b"reply-1")
    assert c.lookup("A", 1, d) == b"reply-1" and c.hits == 1
    assert c.lookup("B", 1, d) is None  # per identity
    assert c.lookup("A", 2, d) is None


def test_replay_same_id_other_bytes_is_einval():
    c = ReplayCache()
    c.remember("A", 1, c.digest(wire.request(1, "thread_create")), b"reply-1")
    out = c.lookup("A", 1, c.digest(wire.request(1, "endpoint_create")))
    reply = wire.parse_reply(out)
    assert reply["ok"] is False and reply["id"] == 1
    err = Error.from_wire(reply["error"])
    assert err.code == Errno.EINVAL and err.details["field"] == "id" and c.hits == 0


def test_replay_cache_is_bounded_per_identity():
    c = ReplayCache(per_identity=4, identities=8)
    for i in range(6):
        c.remember("A", i, c.digest(bytes([i])), bytes([i]))
    assert len(c.replies["A"]) == 4
    assert c.lookup("A", 0, c.digest(b"\x00")) is None and c.lookup("A", 1, c.digest(b"\x01")) is None
    assert c.lookup("A", 5, c.digest(b"\x05")) == b"\x05"


def test_replay_cache_is_bounded_in_identities_least_recent_first():
    c = ReplayCache(per_identity=4, identities=3)
    for who in "ABC":
        c.remember(who, 1, b"d", who.encode())
    c.remember("A", 2, b"e", b"A2")  # A is now the most recent
    c.remember("D", 1, b"d", b"D")
    assert set(c.replies) == {"A", "C", "D"}
    assert c.lookup("B", 1, b"d") is None and c.lookup("A", 1, b"d") == b"A"


def test_pinned_callers_are_never_evicted_by_anyone_elses_traffic():
    live = {"A", "B"}
    c = ReplayCache(per_identity=4, identities=3, pinned=lambda who: who in live)
    c.remember("A", 1, b"d", b"A1")
    c.remember("B", 1, b"d", b"B1")
    for i in range(2000):  # strangers' traffic, many times the unpinned places
        c.remember(f"S{i}", 1, b"d", b"S")
    assert c.lookup("A", 1, b"d") == b"A1" and c.lookup("B", 1, b"d") == b"B1"
    assert len(c.replies) == 3 and c.evicted == 2000 - 1  # the pinned two, and the latest stranger
    assert c.lookup("S1999", 1, b"d") == b"S"  # the caller just added is never the one forgotten
    # once its process is gone a caller is an ordinary one again
    live.discard("A")
    for i in range(4):
        c.remember(f"T{i}", 1, b"d", b"T")
    assert c.lookup("A", 1, b"d") is None and c.lookup("B", 1, b"d") == b"B1"
