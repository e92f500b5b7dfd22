"""One strict pydantic model per call; adapters are built once, at import.

Strict means no coercion: ``"1"`` is not ``1``, ``1.0`` is not ``1``, and
unknown fields are refused. ``validate(table, call, args)`` returns the
model or an ``Error`` naming the offending field; it never raises.

The kernel's models are here; the kernel's table of calls (which model, who
may call, the order of the rules) is ``kernel_server.calls.CALLS``, and its
adapters ``kernel_server.calls.ADAPTERS``. The mm's table is ``MM_CALLS``.
Lists of runs are validated fail-fast: the first bad run ends the work.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from protocol.errors import Errno, Error
from protocol.wire import MAX_RUNS

MAX_FRAME = (1 << 40) - 1  # 4 PiB of 4 KiB frames; profiles narrow it further
MAX_FRAMES_PER_CALL = 1 << 25  # donate/reclaim/frame_info: runs, never expanded before their range is checked
MAX_PAGES_PER_CALL = 1 << 20  # map/unmap/alloc/free: 4 GiB of virtual space
MAX_QUOTA = 1 << 40  # pages or frames in one quota
MAX_SEGMENTS = 1 << 14  # segments in one frame_info or mappings reply (a page of a listing)
MAX_LISTING = 1000  # processes in one page of the kernel's per-process listing
MAX_VADDR = (1 << 64) - 1
MAX_OBJECT_ID = (1 << 63) - 1
KEY_LEN = 40  # a Z85-encoded CURVE public key


def _check_runs(runs: list[list[int]]) -> list[list[int]]:
    n = 0
    for i, (first, count) in enumerate(runs):
        if count < 1:
            raise ValueError(f"run {i} has count {count}; a run needs count >= 1")
        if first + count - 1 > MAX_FRAME:
            raise ValueError(f"run {i} goes beyond frame {MAX_FRAME}")
        n += count
    if n > MAX_FRAMES_PER_CALL:
        raise ValueError(f"{n} frames in one call exceed the limit of {MAX_FRAMES_PER_CALL}")
    return runs


Frame = Annotated[int, Field(ge=0, le=MAX_FRAME)]
Run = Annotated[list[Frame], Field(min_length=2, max_length=2)]
Runs = Annotated[list[Run], Field(min_length=1, max_length=MAX_RUNS, fail_fast=True), AfterValidator(_check_runs)]
Pid = Annotated[int, Field(ge=1, le=MAX_OBJECT_ID)]
ObjId = Annotated[int, Field(ge=1, le=MAX_OBJECT_ID)]
Vaddr = Annotated[int, Field(ge=0, le=MAX_VADDR)]
Pages = Annotated[int, Field(ge=1, le=MAX_PAGES_PER_CALL)]
Prot = Annotated[int, Field(ge=1, le=7)]
Key = Annotated[str, Field(min_length=KEY_LEN, max_length=KEY_LEN, pattern=r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]+$")]


class Args(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Empty(Args):
    pass


# ---- kernel calls ---------------------------------------------------------

Quota = Annotated[int, Field(ge=1, le=MAX_QUOTA)]


class ProcCreate(Args):
    key: Key
    kernel_quota: Quota  # kernel frames this process may cause (address space, tables, threads, endpoints)
    user_quota: Annotated[int, Field(ge=0, le=MAX_QUOTA)] = 0  # user pages the mm granted (shown in stats)


class ProcDestroy(Args):
    pid: Pid


class Donate(Args):
    frames: Runs


class Reclaim(Args):
    count: Optional[Annotated[int, Field(ge=1, le=MAX_FRAMES_PER_CALL)]] = None
    frames: Optional[Runs] = None

    @model_validator(mode="after")
    def _one_of(self) -> "Reclaim":
        if (self.count is None) == (self.frames is None):
            raise ValueError("give exactly one of 'count' or 'frames'")
        return self


class Map(Args):
    pid: Optional[Pid] = None  # a client maps into itself only
    vaddr: Vaddr
    frames: Runs
    prot: Prot
    large: bool = False  # the profile's smallest large page
    page_size: Optional[Annotated[int, Field(ge=4096, le=1 << 30)]] = None  # a large page size of the profile


class Unmap(Args):
    pid: Optional[Pid] = None
    vaddr: Vaddr
    pages: Pages


class ThreadDestroy(Args):
    tid: ObjId


class EndpointDestroy(Args):
    eid: ObjId


class FrameInfo(Args):
    frames: Runs
    max_segments: Annotated[int, Field(ge=1, le=MAX_SEGMENTS)] = 4096


class Mappings(Args):
    """What is mapped in process ``pid`` over [vaddr, vaddr + pages pages): the mm settles an intent
    whose reply was lost by asking exactly this (one intent at a time), never by guessing."""
    pid: Pid
    vaddr: Vaddr
    pages: Annotated[int, Field(ge=1, le=1 << 52)]
    max_segments: Annotated[int, Field(ge=1, le=MAX_SEGMENTS)] = 1024


class Events(Args):
    since: Annotated[int, Field(ge=0, le=MAX_OBJECT_ID)] = 0
    limit: Annotated[int, Field(ge=1, le=1000)] = 256


class Stats(Args):
    """``from_pid``/``limit`` page through the per-process listing (the mm and the operator only)."""
    from_pid: Optional[Annotated[int, Field(ge=0, le=MAX_OBJECT_ID)]] = None
    limit: Annotated[int, Field(ge=1, le=MAX_LISTING)] = 100


# ---- memory-manager calls (client -> mm) ----------------------------------

class Alloc(Args):
    pages: Pages
    prot: Prot
    vaddr: Optional[Vaddr] = None
    large: bool = False


class Free(Args):
    vaddr: Vaddr
    pages: Pages


class Share(Args):
    """An offer of the allocation at ``vaddr`` to ``peer`` (an admitted client with a live process);
    nothing is mapped until the peer accepts it."""
    vaddr: Vaddr
    pages: Pages
    peer: Key
    prot: Prot = 1


class Accept(Args):
    """Map an offer made to the caller, at ``vaddr`` or where the mm places it, charged to the caller."""
    offer: ObjId
    vaddr: Optional[Vaddr] = None


MM_CALLS: dict[str, TypeAdapter] = {
    name: TypeAdapter(model)
    for name, model in {
        "hello": Empty,
        "alloc": Alloc,
        "free": Free,
        "share": Share,
        "accept": Accept,
        "stats": Empty,
        "ping": Empty,
        "audit": Empty,  # the operator only
    }.items()
}


def _describe(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    where = f"args.{loc}" if loc else "args"
    return loc or "args", f"{where}: {first.get('msg', 'invalid')}"


def validate(table: dict[str, TypeAdapter], call: str, args: dict[str, Any]) -> Any:
    """The validated args model for ``call``, or an ``Error`` (ENOSYS / EINVAL)."""
    adapter = table.get(call)
    if adapter is None:
        return Error(Errno.ENOSYS, f"unknown call {call!r}")
    try:
        return adapter.validate_python(args)
    except ValidationError as exc:
        field, message = _describe(exc)
        return Error(Errno.EINVAL, message, {"field": field})
