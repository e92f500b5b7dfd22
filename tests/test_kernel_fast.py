"""The kernel's fast paths decide exactly as the general ones (hypothesis).

- ``kernel_server.fastargs``: whatever the fast check of ``map``/``unmap``/``ping``/``hello``
  accepts, the strict pydantic model accepts too, with the same values (and every refusal is
  the model's: the fast check never refuses); the checks of ``FAST_MODELS`` (an observer's) give
  the very model validation gives. Over random and hostile argument dicts.
- The one-page checks of the core (``KernelCore._map_page``, ``_unmap_page``) and the service's
  written-out hot path: a kernel serving random
  map/unmap requests (good, bad and hostile) through them answers every request with the same
  bytes, ends in the same state and tells its observer the same things (the same models among
  them), as a twin whose fast paths are off (no fast argument checks; ``_map_page`` and
  ``_unmap_page`` disabled), with and without an observer.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kernel_server.calls import ADAPTERS
from kernel_server.fastargs import FAST, FAST_MODELS, MapArgs, UnmapArgs
from kernel_server.observe import KernelObserver, as_frames
from kernel_server.service import KernelService
from protocol import wire
from protocol.calls import MAX_FRAME, MAX_OBJECT_ID, MAX_PAGES_PER_CALL, MAX_VADDR, Map

MM = "M" * 40
CLIENT = "C" * 40

EDGES = [0, 1, 2, 3, 4, 7, 8, -1, 4096, MAX_FRAME, MAX_FRAME + 1, MAX_OBJECT_ID, MAX_OBJECT_ID + 1, MAX_VADDR,
         MAX_VADDR + 1, MAX_PAGES_PER_CALL, MAX_PAGES_PER_CALL + 1, 1 << 25, (1 << 25) + 1, 1 << 64]
hostile = st.one_of(st.sampled_from(EDGES), st.integers(-(1 << 70), 1 << 70), st.booleans(), st.none(),
                    st.floats(allow_nan=True), st.text(max_size=3), st.binary(max_size=3),
                    st.just([]), st.just({}), st.just("1"), st.just(1.0), st.just([[1, 1]]), st.just((1, 1)))
ints = st.one_of(st.sampled_from(EDGES), st.integers(0, 1 << 20))
# what a request can carry (msgpack integers are -2^63 .. 2^64 - 1)
on_wire = hostile.filter(lambda v: not isinstance(v, int) or -(1 << 63) <= v < (1 << 64))


def near(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Integers in lo..hi, their edges and just past them."""
    return st.one_of(st.integers(lo, hi), st.sampled_from([lo - 1, lo, lo + 1, hi - 1, hi, hi + 1]))


@st.composite
def one_run(draw: Any) -> list[int]:
    """A run [first, count] at and around every limit (first, count, their sum, the call's frame limit)."""
    first = draw(st.one_of(near(0, MAX_FRAME), st.sampled_from([MAX_FRAME - (1 << 25) + 1, MAX_FRAME - 4095])))
    count = draw(st.one_of(near(1, 1 << 25), st.sampled_from([MAX_FRAME - first, MAX_FRAME - first + 1,
                                                              MAX_FRAME - first + 2, MAX_FRAME + 1])))
    return [first, count]


USUAL = {  # every field near its limits (most values valid)
    "map": {"pid": st.one_of(st.none(), near(1, MAX_OBJECT_ID)), "vaddr": near(0, MAX_VADDR),
            "frames": st.lists(one_run(), min_size=1, max_size=1), "prot": near(1, 7),
            "large": st.sampled_from([False, False, 0, True, None])},  # (the mm sends large: False)
    "unmap": {"pid": st.one_of(st.none(), near(1, MAX_OBJECT_ID)), "vaddr": near(0, MAX_VADDR),
              "pages": near(1, MAX_PAGES_PER_CALL)},
}
run = st.one_of(one_run(), st.lists(st.one_of(ints, hostile), min_size=0, max_size=3), st.tuples(ints, ints), hostile)
frames = st.one_of(st.lists(one_run(), min_size=1, max_size=1), st.lists(run, min_size=0, max_size=3), hostile)
FIELDS = {
    "map": {"pid": st.one_of(ints, hostile), "vaddr": st.one_of(ints, hostile), "frames": frames,
            "prot": st.one_of(st.integers(-1, 9), hostile), "large": st.one_of(st.booleans(), hostile),
            "page_size": st.one_of(st.sampled_from([None, 4096, 1 << 21, 1 << 22]), hostile)},
    "unmap": {"pid": st.one_of(ints, hostile), "vaddr": st.one_of(ints, hostile),
              "pages": st.one_of(ints, hostile)},
    "ping": {}, "hello": {},
}
DEFAULTS = {"map": {"pid": None, "large": False, "page_size": None}, "unmap": {"pid": None}, "ping": {}, "hello": {}}


@st.composite
def call_args(draw: Any) -> tuple[str, dict[Any, Any]]:
    call = draw(st.sampled_from(sorted(FAST)))
    fields = FIELDS[call]
    if call in USUAL and draw(st.integers(0, 3)):  # the usual shape near every limit, now and then spoilt
        args: dict[Any, Any] = {n: draw(v) for n, v in USUAL[call].items()}
        if draw(st.booleans()):
            del args["pid"]
        if "large" in args and draw(st.booleans()):
            del args["large"]
        spoil = draw(st.integers(0, 5))
        if spoil == 0:
            name = draw(st.sampled_from(sorted(fields)))
            args[name] = draw(st.one_of(fields[name], hostile))
        elif spoil == 1:
            args.pop(draw(st.sampled_from(sorted(args))))
        elif spoil == 2:
            args[draw(st.sampled_from(["large", "page_size", "x", 1, b"pid", "PID", ""]))] = draw(hostile)
        return call, args
    names = draw(st.sets(st.sampled_from(sorted(fields) + ["x"]), max_size=len(fields) + 1)) if fields else set()
    args = {n: draw(fields[n]) if n in fields else draw(hostile) for n in names}
    if draw(st.integers(0, 9)) == 0:
        args[draw(st.sampled_from([1, b"pid", "PID", ""]))] = 1  # keys that are not field names
    return call, args


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call_args())
def test_a_fast_check_accepts_only_what_the_model_accepts_with_the_same_values(ca):
    call, args = ca
    fast = FAST[call](dict(args))
    try:
        model = ADAPTERS[call].validate_python(dict(args))
    except ValidationError:
        model = None
    if fast is None:
        return  # the model decides (and refuses, if it does)
    assert model is not None, f"the fast check accepted what the model refuses: {call} {args!r}"
    values = {**DEFAULTS[call], **(vars(fast) if isinstance(fast, (MapArgs, UnmapArgs)) else {})}
    assert model.model_dump() == values
    for name in model.model_dump():
        assert getattr(fast, name) == getattr(model, name)
    genuine = FAST_MODELS[call](dict(args))  # what an observer is told: the very model
    assert type(genuine) is type(model) and genuine == model and repr(genuine) == repr(model)
    assert genuine.model_fields_set == model.model_fields_set and genuine.model_dump() == model.model_dump()


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(["map", "unmap"]), st.booleans(), st.integers(1, MAX_OBJECT_ID), st.integers(0, MAX_VADDR),
       st.integers(0, MAX_FRAME - 4096), st.integers(1, 4096), st.integers(1, 7), st.integers(1, MAX_PAGES_PER_CALL))
def test_the_usual_requests_take_the_fast_check(call, with_pid, pid, vaddr, first, count, prot, pages):
    args: dict[str, Any] = {"vaddr": vaddr}
    if with_pid:
        args["pid"] = pid
    args.update({"frames": [[first, count]], "prot": prot} if call == "map" else {"pages": pages})
    assert FAST[call](args) is not None and FAST_MODELS[call](args) is not None
    if call == "map":  # as the mm sends it
        assert FAST[call]({**args, "large": False}) is not None
    assert FAST["ping"]({}) is not None and FAST["hello"]({}) is not None


# ---- the service and the core, fast paths on and off --------------------------------------------------

class Watching(KernelObserver):
    """Everything the kernel tells an observer, in order (the models it is given compared by value)."""

    def __init__(self) -> None:
        self.told: list[tuple] = []

    def call_begun(self, caller, name, args) -> None:
        self.told.append(("begun", caller, name, type(args), args))

    def call_ended(self, caller, name, result) -> None:
        self.told.append(("ended", caller, name, result if isinstance(result, dict) else repr(result)))

    def refused(self, identity, name, error) -> None:
        self.told.append(("refused", identity, name, repr(error)))

    def replay_miss(self, identity, req_id) -> None:
        self.told.append(("miss", identity, req_id))

    def frames_written(self, frames) -> None:
        self.told.append(("frames", as_frames(frames).tolist()))

    def process_changed(self, pid) -> None:
        self.told.append(("process", pid))

    def probe(self, name) -> None:
        self.told.append(("probe", name))


def _kernel(fast: bool, observer: KernelObserver | None = None) -> tuple[KernelService, int, int]:
    svc = KernelService.boot(arch="i686", memory=32 << 20, mm_key=MM, lease_seconds=3600.0, observer=observer)
    if not fast:  # the general checks decide every map and unmap
        svc._fast = {}
        svc.core._map_page = lambda proc, args, first: None
        svc.core._unmap_page = lambda caller, proc, vp: None
    pid = svc.call(MM, "proc_create", {"key": CLIENT, "kernel_quota": 4})["pid"]
    first = next(e["first"] for e in svc.call(MM, "address_map")["entries"] if e["kind"] == "user")
    return svc, pid, first


def _large_run(svc: KernelService) -> int:
    """The first frame of 1024 user frames aligned to 1024 (a 4 MiB page on i686)."""
    for e in svc.call(MM, "address_map")["entries"]:
        f = -(-e["first"] // 1024) * 1024
        if e["kind"] == "user" and f + 1024 <= e["first"] + e["count"]:
            return f
    raise AssertionError("no room for a large page")


@st.composite
def requests(draw: Any, pid: int, first: int, image: int, big: int) -> list[tuple[str, bytes]]:
    """Map/unmap requests over a few pages and frames (most valid, some not), from the mm and the client;
    now and then a large page (4 MiB) is mapped or unmapped too, next to the small pages."""
    out = []
    vaddrs = [0x1000_0000 + i * 4096 for i in range(4)] + [0x1040_0000, 0x2000_0000, 0x1000_0800, 0xBFFF_F000,
                                                            0xC000_0000]
    frames = [first + i for i in range(4)] + [image, first - 1, 1 << 30]
    for i in range(draw(st.integers(1, 60))):
        who = draw(st.sampled_from([MM, MM, MM, CLIENT]))
        call = draw(st.sampled_from(["map", "unmap"]))
        args: dict[str, Any] = {"vaddr": draw(st.sampled_from(vaddrs))}
        if who == MM or draw(st.booleans()):
            args["pid"] = draw(st.sampled_from([pid, pid, pid + 1]))
        if who == MM and call == "map" and draw(st.booleans()):
            args["large"] = False  # (as the mm sends it)
        if who == MM and draw(st.integers(0, 14)) == 0:  # a large page, or part of one
            args = {"pid": pid, "vaddr": 0x1040_0000}
            if call == "map":
                args.update(frames=[[big, 1024]], prot=3, large=True)
            else:
                args["pages"] = draw(st.sampled_from([1, 1024]))
        elif call == "map":
            f = draw(st.sampled_from(frames))
            args["frames"] = draw(st.sampled_from([[[f, 1]], [[f, 1]], [[f, 2]], [[f, 1], [f + 2, 1]]]))
            args["prot"] = draw(st.sampled_from([1, 3, 3, 5, 6, 7]))
            if draw(st.integers(0, 9)) == 0:
                args[draw(st.sampled_from(["large", "page_size", "x"]))] = draw(on_wire)
        else:
            args["pages"] = draw(st.sampled_from([1, 1, 1, 2, 1025]))
        if draw(st.integers(0, 19)) == 0:
            args[draw(st.sampled_from(["vaddr", "pid", "prot", "pages"]))] = draw(on_wire)
        out.append((who, wire.request(i + 1, call, args)))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_the_fast_paths_answer_and_change_exactly_what_the_general_ones_do(data):
    observed = data.draw(st.booleans())
    fast, pid, first = _kernel(True, Watching() if observed else None)
    slow, _, _ = _kernel(False, Watching() if observed else None)
    image = next(e["first"] for e in fast.call(MM, "address_map")["entries"] if e["kind"] == "kernel_image")
    big = _large_run(fast)
    if observed:
        fast.observer.told.clear()
        slow.observer.told.clear()
    for who, req in data.draw(requests(pid, first, image, big)):
        a, b = fast.handle(who, req, 0.0), slow.handle(who, req, 0.0)
        assert a == b, (wire.decode(req), wire.decode(a), wire.decode(b))
    assert fast.core.digest() == slow.core.digest()
    if observed:  # the same reports, in the same order, the same models among them
        assert fast.observer.told == slow.observer.told


def test_an_observer_keeps_the_fast_argument_checks_and_gets_genuine_models():
    watching = Watching()
    svc, pid, first = _kernel(True, watching)
    assert svc._fast is FAST_MODELS
    args = {"pid": pid, "vaddr": 0x1000_0000, "frames": [[first, 1]], "prot": 3, "large": False}
    svc.handle(MM, wire.request(1, "map", args), 0.0)
    begun = [t for t in watching.told if t[0] == "begun"]
    assert begun[-1][3:] == (Map, ADAPTERS["map"].validate_python(args))
    svc.set_observer(None)
    assert svc._fast is FAST


def test_the_caller_rules_the_service_skips_pass_without_a_look():
    """``KernelService._execute`` asks ``refuse_caller`` nothing for anyone's calls and for the mm's map and
    unmap: for those it would let every caller (every mm) through."""
    from kernel_server.service import _CALLER_CHECK

    svc, _pid, _first = _kernel(True)
    core = svc.core
    callers = [MM, CLIENT, "S" * 40, "O" * 40]
    for name, check in _CALLER_CHECK.items():
        if check == 0:
            assert all(core.refuse_caller(c, name, {"frames": [[0, 1]] * 100, "pages": 1 << 20}) is None
                       for c in callers), name
        elif check == 1:
            assert core.refuse_caller(MM, name, {"frames": [[0, 1]] * 100, "pages": 1 << 20}) is None, name
            assert core.refuse_caller(CLIENT, name, {"frames": [[0, 1]] * 100}) is not None, name  # it looks
