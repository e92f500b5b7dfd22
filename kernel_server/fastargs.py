"""Fast argument checks for the kernel's hottest calls, equivalent to their pydantic models.

``FAST[call](args)`` looks at a decoded ``args`` dict of ``map``, ``unmap``, ``ping`` or ``hello``
and returns arguments the kernel core can use at once, or None: then the strict pydantic model
(``kernel_server.calls.ADAPTERS``) decides, and gives its refusal if there is one. A fast check
accepts only what the model accepts, and nothing unusual: exactly the model's fields (the
optional ones absent or given), ints that are ints (``type(x) is int``: no bool, no float, no
string), in the model's ranges, and for ``map`` exactly one run of frames, a 4 KiB-page map
(``large`` absent or ``False`` itself, as the mm sends it; ``page_size`` absent). Anything else,
valid or not, goes to the model, so every refusal is the model's own, with its message and
``field``.

What a fast check returns reads like the model: ``MapArgs``/``UnmapArgs`` carry the validated
request dict as their ``__dict__`` (``args.vaddr``, ``vars(args)``), with the model's defaults
for the fields the request left out as class attributes; ``ping``/``hello`` get the one shared
(frozen) ``Empty`` model. ``FAST_MODELS`` are the same checks returning the genuine model
instead (``model(checked)``: the instance validation gives, equal to it field for field and in
``model_fields_set``, built without validating again): the service uses them while an observer
is set, so an observer is told of the very models the general path gives and the fast checks
stay on. ``tests/test_kernel_fast.py`` proves the equivalence with hypothesis over random and
hostile argument dicts.
"""

from __future__ import annotations

from typing import Any, Callable

from protocol.calls import (MAX_FRAME, MAX_FRAMES_PER_CALL, MAX_OBJECT_ID, MAX_PAGES_PER_CALL, MAX_VADDR, Empty,
                            Map, Unmap)

_new = object.__new__
_set = object.__setattr__
_MAP_KEYS_MM = frozenset(("pid", "vaddr", "frames", "prot", "large"))  # what the mm sends
_MAP_KEYS = frozenset(("pid", "vaddr", "frames", "prot"))
_MAP_KEYS_NO_PID = frozenset(("vaddr", "frames", "prot"))
_MAP_KEYS_NO_PID_LARGE = frozenset(("vaddr", "frames", "prot", "large"))
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
    """``Map`` for ``{pid?, vaddr, frames: [[first, count]], prot, large: False?}``, or None (the model
    decides)."""
    keys = args.keys()
    if not (keys == _MAP_KEYS_MM or keys == _MAP_KEYS or keys == _MAP_KEYS_NO_PID or keys == _MAP_KEYS_NO_PID_LARGE):
        return None
    if args.get("large", False) is not False:  # (a large page, or not a bool: the model decides)
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


def _map_model_of(args: dict[str, Any]) -> Map:
    """The ``Map`` validation gives for a dict ``map_args`` accepted: its fields in declaration order, the
    defaults of those left out, ``model_fields_set`` the fields given; set as ``BaseModel.model_construct``
    sets them, without its Python-level walk over the fields."""
    m = _new(Map)
    _set(m, "__dict__", {"pid": args.get("pid"), "vaddr": args["vaddr"], "frames": args["frames"],
                         "prot": args["prot"], "large": False, "page_size": None})
    _set(m, "__pydantic_fields_set__", set(args))
    _set(m, "__pydantic_extra__", None)
    _set(m, "__pydantic_private__", None)
    return m


def _unmap_model_of(args: dict[str, Any]) -> Unmap:
    """The ``Unmap`` validation gives for a dict ``unmap_args`` accepted (as ``_map_model_of``)."""
    m = _new(Unmap)
    _set(m, "__dict__", {"pid": args.get("pid"), "vaddr": args["vaddr"], "pages": args["pages"]})
    _set(m, "__pydantic_fields_set__", set(args))
    _set(m, "__pydantic_extra__", None)
    _set(m, "__pydantic_private__", None)
    return m


def map_model(args: dict[str, Any]) -> Map | None:
    """``map_args``' check, returning the genuine ``Map`` (None: the model decides)."""
    return None if map_args(args) is None else _map_model_of(args)


def unmap_model(args: dict[str, Any]) -> Unmap | None:
    """``unmap_args``' check, returning the genuine ``Unmap`` (None: the model decides)."""
    return None if unmap_args(args) is None else _unmap_model_of(args)


FAST: dict[str, Callable[[dict[str, Any]], Any]] = {
    "map": map_args,
    "unmap": unmap_args,
    "ping": empty_args,
    "hello": empty_args,
}
FAST_MODELS: dict[str, Callable[[dict[str, Any]], Any]] = {  # the same checks, genuine models (observed)
    "map": map_model,
    "unmap": unmap_model,
    "ping": empty_args,
    "hello": empty_args,
}

__all__ = ["EMPTY", "FAST", "FAST_MODELS", "MapArgs", "UnmapArgs", "empty_args", "map_args", "map_model",
           "unmap_args", "unmap_model"]
