"""The mm's fast argument checks decide exactly as its pydantic models (hypothesis).

Whatever the fast check of ``alloc``/``free`` (``mm_service.fastargs``) accepts, the strict model of
``protocol.calls.MM_CALLS`` accepts too, with the same values (and every refusal is the model's: the
fast check never refuses), over random and hostile argument dicts; the usual requests take the fast
check; and an mm with the fast checks answers random alloc/free requests (good, bad and hostile) with
the same bytes, and ends with the same view, as one without them.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mm_service.fastargs import FAST, AllocArgs, FreeArgs
from protocol import wire
from protocol.calls import MAX_PAGES_PER_CALL, MAX_VADDR, MM_CALLS
from mm_support import SWorld

EDGES = [0, 1, 2, 3, 7, 8, -1, 4096, MAX_VADDR, MAX_VADDR + 1, MAX_PAGES_PER_CALL, MAX_PAGES_PER_CALL + 1, 1 << 64]
hostile = st.one_of(st.sampled_from(EDGES), st.integers(-(1 << 70), 1 << 70), st.booleans(), st.none(),
                    st.floats(allow_nan=True), st.text(max_size=3), st.binary(max_size=3),
                    st.just([]), st.just({}), st.just("1"), st.just(1.0), st.just([[1, 1]]), st.just(0.0))

on_wire = hostile.filter(lambda v: not isinstance(v, int) or -(1 << 63) <= v < (1 << 64))  # (msgpack's integers)


def near(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(lo, hi), st.sampled_from([lo - 1, lo, lo + 1, hi - 1, hi, hi + 1]))


FIELDS = {
    "alloc": {"pages": st.one_of(near(1, MAX_PAGES_PER_CALL), hostile), "prot": st.one_of(near(1, 7), hostile),
              "vaddr": st.one_of(st.none(), near(0, MAX_VADDR), hostile),
              "large": st.one_of(st.booleans(), hostile)},
    "free": {"vaddr": st.one_of(near(0, MAX_VADDR), hostile), "pages": st.one_of(near(1, MAX_PAGES_PER_CALL), hostile)},
}
DEFAULTS = {"alloc": {"vaddr": None, "large": False}, "free": {}}


@st.composite
def call_args(draw: Any) -> tuple[str, dict[Any, Any]]:
    call = draw(st.sampled_from(sorted(FAST)))
    fields = FIELDS[call]
    names = draw(st.sets(st.sampled_from(sorted(fields) + ["x"]), max_size=len(fields) + 1))
    if draw(st.integers(0, 2)):  # mostly the required fields
        names |= {"pages", "prot"} if call == "alloc" else {"vaddr", "pages"}
    args: dict[Any, Any] = {n: draw(fields[n]) if n in fields else draw(hostile) for n in names}
    if draw(st.integers(0, 9)) == 0:
        args[draw(st.sampled_from([1, b"pages", "PAGES", ""]))] = 1  # keys that are not field names
    return call, args


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call_args())
def test_a_fast_check_accepts_only_what_the_model_accepts_with_the_same_values(ca):
    call, args = ca
    fast = FAST[call](dict(args))
    try:
        model = MM_CALLS[call].validate_python(dict(args))
    except ValidationError:
        model = None
    if fast is None:
        return  # the model decides (and refuses, if it does)
    assert model is not None, f"the fast check accepted what the model refuses: {call} {args!r}"
    assert isinstance(fast, (AllocArgs, FreeArgs))
    assert model.model_dump() == {**DEFAULTS[call], **vars(fast)}
    for name in model.model_dump():
        assert getattr(fast, name) == getattr(model, name)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, MAX_PAGES_PER_CALL), st.integers(1, 7), st.one_of(st.none(), st.integers(0, MAX_VADDR)),
       st.one_of(st.none(), st.booleans()))
def test_the_usual_requests_take_the_fast_check(pages, prot, vaddr, large):
    args: dict[str, Any] = {"pages": pages, "prot": prot}
    if vaddr is not None:
        args["vaddr"] = vaddr
    if large is not None:
        args["large"] = large
    assert FAST["alloc"](args) is not None
    assert FAST["free"]({"vaddr": vaddr or 0, "pages": pages}) is not None


A, B = "A" * 40, "B" * 40


@st.composite
def requests(draw: Any) -> list[tuple[str, bytes]]:
    """Alloc/free requests of two clients over a few addresses (most valid, some not)."""
    out = []
    vaddrs = [None, 0x40_0000, 0x40_1000, 0x50_0000, 0x40_0800, MAX_VADDR]
    for i in range(draw(st.integers(1, 30))):
        who = draw(st.sampled_from([A, A, B]))
        if draw(st.booleans()):
            args: dict[str, Any] = {"pages": draw(st.sampled_from([1, 1, 2, 3])), "prot": draw(st.sampled_from([1, 3, 5, 7]))}
            v = draw(st.sampled_from(vaddrs))
            if v is not None:
                args["vaddr"] = v
            call = "alloc"
        else:
            args = {"vaddr": draw(st.sampled_from(vaddrs[1:])), "pages": draw(st.sampled_from([1, 1, 2]))}
            call = "free"
        if draw(st.integers(0, 9)) == 0:
            args[draw(st.sampled_from(["pages", "prot", "vaddr", "large", "x"]))] = draw(on_wire)
        out.append((who, wire.request(i + 1, call, args)))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_an_mm_with_fast_checks_answers_and_changes_what_one_without_does(reqs):
    fast, slow = SWorld(), SWorld()
    slow.svc._fast = {}  # the models decide every request
    for who, data in reqs:
        a, b = fast.handle(who, data), slow.handle(who, data)
        assert a == b, (wire.decode(data), wire.decode(a), wire.decode(b))
    assert fast.mm.view.snapshot() == slow.mm.view.snapshot()
    assert fast.journal == slow.journal
