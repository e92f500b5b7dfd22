"""Fast argument checks for the kernel's hottest calls, equivalent to their pydantic models.

``FAST[call](args)`` looks at a decoded ``args`` dict of ``map``, ``unmap``, ``ping`` or ``hello``
and returns arguments the kernel core can use at once, or None: then the strict pydantic model
(``kernel_server.calls.ADAPTERS``) decides, and gives its refusal if there is one. A fast check
accepts only what the model accepts, and nothing unusual: exactly the model's fields (the
optional ones absent or given), ints that are ints (``type(x) is int``: no bool, no float, no
string), in the model's ranges, and for ``map`` exactly one run of frames, a 4 KiB-page map
(``large`` and ``page_size`` absent). Anything else, valid or not, goes to the model, so every
refusal is the model's own, with its message and ``field``.

What a fast check returns reads like the model: ``MapArgs``/``UnmapArgs`` carry the validated
request dict as their ``__dict__`` (``args.vaddr``, ``vars(args)``), with the model's defaults
for the fields the request left out as class attributes; ``ping``/``hello`` get the one shared
(frozen) ``Empty`` model. The service uses them only when no observer is set: an observer is
told of genuine models. ``tests/test_kernel_fast.py`` proves the equivalence with hypothesis
over random and hostile argument dicts.
"""

from __future__ import annotations

from typing import Any, Callable

from protocol.calls import MAX_FRAME, MAX_FRAMES_PER_CALL, MAX_OBJECT_ID, MAX_PAGES_PER_CALL, MAX_VADDR, Empty

_new = object.__new__
_MAP_KEYS = frozenset(("pid", "vaddr", "frames", "prot"))
_MAP_KEYS_NO_PID = frozenset(("vaddr", "frames", "prot"))
_UNMAP_KEYS = frozenset(("pid", "vaddr", "pages"))
_UNMAP_KEYS_NO_PID = frozenset(("vaddr", "pages"))
_MAX_COUNT = min(MAX_FRAME, MAX_FRAMES_PER_CALL)  # a run's count: a Frame, and the call's frame limit
EMPTY = Empty()  # every ping and hello: the model of {} (frozen, so one can be shared)


class MapArgs:
    """``protocol.calls.Map`` as a fast check returns it: one run, 4 KiB pages."""

    pid: int | None = None
    large = False
    page_size = None
    vaddr: int
    frames: list[list[int]]
    prot: int


class UnmapArgs:
    """``protocol.calls.Unmap`` as a fast check returns it."""

    pid: int | None = None
    vaddr: int
    pages: int


def map_args(args: dict[str, Any]) -> MapArgs | None:
    """``Map`` for ``{pid?, vaddr, frames: [[first, count]], prot}``, or None (the model decides)."""
    keys = args.keys()
    if not (keys == _MAP_KEYS or keys == _MAP_KEYS_NO_PID):
        return None
    vaddr, frames, prot = args["vaddr"], args["frames"], args["prot"]
    if (type(vaddr) is not int or not 0 <= vaddr <= MAX_VADDR or type(prot) is not int or not 1 <= prot <= 7
            or type(frames) is not list or len(frames) != 1):
        return None
    run = frames[0]
    if type(run) is not list or len(run) != 2:
        return None
    first, count = run
    if (type(first) is not int or type(count) is not int or not 0 <= first <= MAX_FRAME
            or not 1 <= count <= _MAX_COUNT or first + count - 1 > MAX_FRAME):
        return None
    pid = args.get("pid")
    if pid is not None and (type(pid) is not int or not 1 <= pid <= MAX_OBJECT_ID):
        return None
    out = _new(MapArgs)
    out.__dict__ = args
    return out


def unmap_args(args: dict[str, Any]) -> UnmapArgs | None:
    """``Unmap`` for ``{pid?, vaddr, pages}``, or None (the model decides)."""
    keys = args.keys()
    if not (keys == _UNMAP_KEYS or keys == _UNMAP_KEYS_NO_PID):
        return None
    vaddr, pages = args["vaddr"], args["pages"]
    if type(vaddr) is not int or not 0 <= vaddr <= MAX_VADDR or type(pages) is not int \
            or not 1 <= pages <= MAX_PAGES_PER_CALL:
        return None
    pid = args.get("pid")
    if pid is not None and (type(pid) is not int or not 1 <= pid <= MAX_OBJECT_ID):
        return None
    out = _new(UnmapArgs)
    out.__dict__ = args
    return out


def empty_args(args: dict[str, Any]) -> Empty | None:
    """``Empty`` for ``{}``, or None (the model decides)."""
    return EMPTY if not args else None


FAST: dict[str, Callable[[dict[str, Any]], Any]] = {
    "map": map_args,
    "unmap": unmap_args,
    "ping": empty_args,
    "hello": empty_args,
}

__all__ = ["EMPTY", "FAST", "MapArgs", "UnmapArgs", "empty_args", "map_args", "unmap_args"]
