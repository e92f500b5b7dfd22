"""Fast argument checks for the mm's hottest calls (``alloc``, ``free``), equivalent to their pydantic models.

Rules for this file: no sockets, clocks, randomness or I/O. ``FAST[call](args)`` looks at a decoded
``args`` dict and returns arguments the policy can use at once, or None: then the strict pydantic
model (``protocol.calls.MM_CALLS``) decides, and gives its refusal if there is one. A fast check
accepts only what the model accepts, and nothing unusual: only the model's fields (the required
ones given, the optional ones absent or given), ints that are ints (``type(x) is int``: no bool,
no float, no string) in the model's ranges, a ``large`` that is a bool, a ``vaddr`` of ``alloc``
that is an int or None. Anything else, valid or not, goes to the model, so every refusal is the
model's own, with its message and ``field``.

What a fast check returns reads like the model: ``AllocArgs``/``FreeArgs`` carry the validated
request dict as their ``__dict__`` (``args.pages``), with the model's defaults for the fields the
request left out as class attributes. ``tests/test_mm_fast.py`` proves the equivalence with
hypothesis over random and hostile argument dicts (as ``kernel_server.fastargs`` does the kernel's).
"""

from __future__ import annotations

from typing import Any, Callable

from protocol.calls import MAX_PAGES_PER_CALL, MAX_VADDR

_new = object.__new__
_ALLOC_KEYS = frozenset(("pages", "prot", "vaddr", "large"))
_FREE_KEYS = frozenset(("vaddr", "pages"))


class AllocArgs:
    """``protocol.calls.Alloc`` as a fast check returns it."""

    vaddr: int | None = None
    large = False
    pages: int
    prot: int


class FreeArgs:
    """``protocol.calls.Free`` as a fast check returns it."""

    vaddr: int
    pages: int


def alloc_args(args: dict[str, Any]) -> AllocArgs | None:
    """``Alloc`` for ``{pages, prot, vaddr?, large?}``, or None (the model decides)."""
    if not args.keys() <= _ALLOC_KEYS or "pages" not in args or "prot" not in args:
        return None
    pages, prot = args["pages"], args["prot"]
    if type(pages) is not int or not 1 <= pages <= MAX_PAGES_PER_CALL or type(prot) is not int or not 1 <= prot <= 7:
        return None
    vaddr = args.get("vaddr")
    if vaddr is not None and (type(vaddr) is not int or not 0 <= vaddr <= MAX_VADDR):
        return None
    if type(args.get("large", False)) is not bool:
        return None
    out = _new(AllocArgs)
    out.__dict__ = args
    return out


def free_args(args: dict[str, Any]) -> FreeArgs | None:
    """``Free`` for ``{vaddr, pages}``, or None (the model decides)."""
    if args.keys() != _FREE_KEYS:
        return None
    vaddr, pages = args["vaddr"], args["pages"]
    if type(vaddr) is not int or not 0 <= vaddr <= MAX_VADDR or type(pages) is not int \
            or not 1 <= pages <= MAX_PAGES_PER_CALL:
        return None
    out = _new(FreeArgs)
    out.__dict__ = args
    return out


FAST: dict[str, Callable[[dict[str, Any]], Any]] = {"alloc": alloc_args, "free": free_args}

__all__ = ["FAST", "AllocArgs", "FreeArgs", "alloc_args", "free_args"]
