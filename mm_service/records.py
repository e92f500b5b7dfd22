"""The mm's journal records: one frozen dataclass per kind, and their one wire form.

Rules for this file: no sockets, clocks, randomness or I/O. Every change of
the mm's view is one of these records (``View.apply``); the journal stores
them, in the order they were applied, and replaying them over the kernel's
boot address map rebuilds the view. ``encode``/``decode`` here are the only
place that knows their wire form: a msgpack array ``[tag, field, ...]`` with
the fields in the order the dataclass declares them.

The records:

- ``NewClient``: a process the kernel made for a client key, with the user
  page quota and the kernel frame quota the mm granted it.
- ``ClientGone``: that process is gone (its mappings, offers and pending
  intents go with it; its quotas go back to the budget).
- ``Intent``: a map or unmap the mm is about to ask the kernel for. It is
  applied (and journaled) before the kernel is asked; ``Done`` or ``Undo``
  settles it. It carries the request it serves (``caller``, ``rid``,
  ``digest``), so a resend after a restart gets the reply the request got.
- ``Offered``: a ``share`` made an offer of an allocation to a peer.
- ``Donate`` / ``Reclaim``: frames moved to / from the kernel.
- ``EventsRead``: the kernel's events were read up to ``seq``.
- ``Reply``: a refusal given after the request had changed something.
- ``Repair`` / ``RepairMapping``: recovery made the view match the kernel
  (frame states; one allocation's mappings as the kernel shows them).
- ``Snapshot``: the whole view; it replaces every record before it.

``JOURNAL_FORMAT`` names this wire form; a journal in another format is
refused with a message saying so (``mm_service.journal``).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, Union

JOURNAL_FORMAT = 2  # 1: the dict ops of earlier versions (not read)

Runs = list  # [[first, count], ...]


@dataclass(frozen=True, slots=True)
class NewClient:
    key: str
    pid: int
    quota: int  # user pages granted
    kernel_quota: int  # kernel frames granted


@dataclass(frozen=True, slots=True)
class ClientGone:
    key: str


@dataclass(frozen=True, slots=True)
class Intent:
    n: int  # intent number (never reused)
    do: str  # "map" or "unmap"
    key: str  # whose address space
    vaddr: int
    pages: int
    frames: Runs
    prot: int = 0
    large: bool = False
    offer: int = 0  # a map that accepts this offer (0: an allocation of its own)
    caller: str | None = None  # the request it serves (None: none)
    rid: int | None = None
    digest: bytes | None = None


@dataclass(frozen=True, slots=True)
class Done:
    n: int


@dataclass(frozen=True, slots=True)
class Undo:
    n: int


@dataclass(frozen=True, slots=True)
class Offered:
    offer: int  # offer number (never reused)
    key: str  # who offers
    vaddr: int  # its allocation
    pages: int
    prot: int
    peer: str  # who may accept
    caller: str | None = None
    rid: int | None = None
    digest: bytes | None = None


@dataclass(frozen=True, slots=True)
class Donate:
    frames: Runs


@dataclass(frozen=True, slots=True)
class Reclaim:
    frames: Runs


@dataclass(frozen=True, slots=True)
class EventsRead:
    seq: int


@dataclass(frozen=True, slots=True)
class Reply:
    key: str
    rid: int
    digest: bytes
    reply: bytes


@dataclass(frozen=True, slots=True)
class Repair:
    frames: Runs
    state: int  # the view's frame state (view.KERNEL / FREE / USED)
    refs: int = 0  # for USED: the reference count the kernel shows


@dataclass(frozen=True, slots=True)
class RepairMapping:
    key: str
    vaddr: int  # the allocation the view had there (dropped)
    segments: list  # what the kernel maps in its range instead: [[vaddr, pages, first, prot, large], ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    body: dict  # see View.snapshot


Record = Union[NewClient, ClientGone, Intent, Done, Undo, Offered, Donate, Reclaim, EventsRead, Reply, Repair,
               RepairMapping, Snapshot]

TAGS: dict[type, str] = {
    NewClient: "client", ClientGone: "gone", Intent: "intent", Done: "done", Undo: "undo", Offered: "offer",
    Donate: "donate", Reclaim: "reclaim", EventsRead: "events", Reply: "reply", Repair: "repair",
    RepairMapping: "remap", Snapshot: "snapshot",
}
KINDS: dict[str, type] = {tag: cls for cls, tag in TAGS.items()}
_FIELDS: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in fields(cls)) for cls in TAGS}
_REQUIRED: dict[type, int] = {cls: sum(1 for f in fields(cls) if f.default is MISSING) for cls in TAGS}


def quick_init(cls: type) -> None:
    """Give a frozen dataclass with slots (a record class, the driver's events and actions) the ``__init__``
    dataclasses writes for it (the same parameters, defaults and values set), but with each slot's setter
    bound once: the generated one looks ``object.__setattr__`` up and calls it for every field, which made
    an ``Intent`` cost twice as much."""
    fs = fields(cls)
    params = ", ".join(["self"] + [f.name if f.default is MISSING else f"{f.name}=_default_{f.name}" for f in fs])
    body = "".join(f"    _set_{f.name}(self, {f.name})\n" for f in fs) or "    pass\n"
    ns: dict[str, Any] = {f"_set_{f.name}": getattr(cls, f.name).__set__ for f in fs}
    ns.update({f"_default_{f.name}": f.default for f in fs if f.default is not MISSING})
    exec(f"def __init__({params}):\n{body}", ns)  # (as dataclasses makes its own)
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[misc]


for _cls in TAGS:
    quick_init(_cls)


class RecordError(ValueError):
    """A journal row that is not a record of this format."""


def encode(rec: Record) -> list[Any]:
    """The wire form of a record: ``[tag, field, ...]``."""
    cls = type(rec)
    return [TAGS[cls], *[getattr(rec, name) for name in _FIELDS[cls]]]


def decode(item: Any) -> Record:
    """The record of a wire form; RecordError if it is not one."""
    if not isinstance(item, (list, tuple)) or not item or not isinstance(item[0], str):
        raise RecordError(f"not a journal record: {str(item)[:80]}")
    cls = KINDS.get(item[0])
    if cls is None:
        raise RecordError(f"unknown journal record kind {item[0]!r}")
    n = len(item) - 1
    if not _REQUIRED[cls] <= n <= len(_FIELDS[cls]):
        raise RecordError(f"journal record {item[0]!r} has {n} fields, expected {_REQUIRED[cls]}..{len(_FIELDS[cls])}")
    return cls(*item[1:])
