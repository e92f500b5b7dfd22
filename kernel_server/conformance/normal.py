"""What a vector says and what it leaves to the implementation: roles for keys, the normative part
of each reply, and object ids relative to a case's start.

Roles. A vector names callers by role: ``mm`` (the key the kernel was told at boot), ``operator``
(always admitted, reads what the mm reads), ``client-0`` .. ``client-N`` (admitted client keys; a
client has a process only once the mm creates one for it) and ``stranger`` (an admitted client key
that never gets a process). An argument that is a key is written ``{"$key": ROLE}``; keys in
replies (hello's identity, the listing's and the events' key) are written as the role.

Replies. ``{"ok": true, "result": {...}}`` with only the fields of ``RESULT_FIELDS[call]``, or
``{"ok": false, "error": ERRNO_NAME, "details": {...}}`` with every detail but the message;
EINVAL's ``field`` is cut to the top-level argument it names (``frames.0.1`` -> ``frames``).
Not normative, so never in a vector: messages, the service's counters (calls, refused, replayed,
replies_dropped), hello's lease and boot id, and the frames a ``reclaim {count}`` took (which
free frames the kernel hands back is its own choice; how many is normative).

Object ids. pids, tids and eids are numbered by one kernel-wide counter each, from 1, one per
object created, never reused; event sequence numbers likewise. A replayer that runs several cases
on one kernel translates them (``Ids``): the vector's id ``i`` is the kernel's ``base + i``.
"""

from __future__ import annotations

from typing import Any, Callable

from protocol.errors import Error

KEY_REF = "$key"
ROLES_FIXED = ("mm", "operator", "stranger")

RESULT_FIELDS: dict[str, tuple[str, ...]] = {
    "hello": ("v", "arch", "page_size", "large_page_sizes", "user_top", "frames", "kernel_limit", "identity",
              "is_mm", "is_operator", "pid", "process_cost"),
    "address_map": ("arch", "frames", "kernel_limit", "entries", "unaddressable"),
    "ping": ("pid",),
    "stats": ("ram", "kernel_free", "kernel_used", "kernel_shared", "user_free", "user_mapped", "kernel_reserved",
              "frames", "processes", "slab_frames", "event_seq", "you", "per_process", "next_pid", "large_mappings"),
    "proc_create": ("pid", "kernel_frames", "kernel_limit", "kernel_free", "kernel_reserved"),
    "proc_destroy": ("pid", "unmapped_pages", "kernel_frames_freed", "frames", "truncated", "shared_unmapped",
                     "kernel_free", "kernel_reserved"),
    "donate": ("donated", "kernel_free", "kernel_reserved"),
    "reclaim": ("frames", "reclaimed", "kernel_free", "kernel_reserved", "truncated"),  # frames: explicit only
    "map": ("pid", "pages", "tables_allocated", "kernel_free", "kernel_reserved"),
    "unmap": ("pid", "pages", "frames", "tables_freed", "kernel_free", "kernel_reserved", "truncated"),
    "thread_create": ("tid", "kernel_frames"),
    "thread_destroy": ("tid",),
    "endpoint_create": ("eid", "kernel_frames"),
    "endpoint_destroy": ("eid",),
    "frame_info": ("segments", "rest"),
    "mappings": ("pid", "segments", "rest"),
    "events": ("events", "next", "lost", "latest", "kernel_free", "kernel_reserved"),
}
KEY_FIELDS = frozenset(("identity", "key"))  # reply fields holding a key (written as a role)
# id fields of arguments, results and error details, and the counter they count in
ID_FIELDS = {"pid": "pid", "from_pid": "pid", "next_pid": "pid", "tid": "tid", "eid": "eid",
             "since": "seq", "seq": "seq", "next": "seq", "latest": "seq", "event_seq": "seq"}
ZERO_OK = frozenset(("from_pid", "since", "next", "latest", "event_seq"))  # 0 is a value, not "none"


def client(i: int) -> str:
    return f"client-{i}"


def is_role(name: str) -> bool:
    if name in ROLES_FIXED:
        return True
    head, _, num = name.partition("-")
    return head == "client" and num.isdigit()


def resolve(args: Any, key_of: Callable[[str], str]) -> Any:
    """``args`` with every ``{"$key": ROLE}`` replaced by that role's key."""
    if isinstance(args, dict):
        if len(args) == 1 and KEY_REF in args:
            return key_of(args[KEY_REF])
        return {k: resolve(v, key_of) for k, v in args.items()}
    if isinstance(args, list):
        return [resolve(v, key_of) for v in args]
    return args


def _roles(value: Any, role_of: Callable[[str], str]) -> Any:
    """Keys in a reply replaced by roles."""
    if isinstance(value, dict):
        return {k: (role_of(v) if k in KEY_FIELDS and isinstance(v, str) else _roles(v, role_of))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_roles(v, role_of) for v in value]
    return value


def expected(call: str, args: dict[str, Any], out: dict[str, Any] | Error,
             role_of: Callable[[str], str]) -> dict[str, Any]:
    """The normative part of a reply (see the module docstring)."""
    if isinstance(out, Error):
        details = dict(out.details)
        if "field" in details and isinstance(details["field"], str):
            details["field"] = details["field"].split(".")[0]
        return {"ok": False, "error": out.code.name, "details": _roles(details, role_of)}
    keep = RESULT_FIELDS.get(call, ())
    result = {k: out[k] for k in keep if k in out}
    if call == "reclaim" and "count" in args:
        result.pop("frames", None)
    return {"ok": True, "result": _roles(result, role_of)}


class Ids:
    """Vector ids <-> a kernel's ids, when several cases run on one kernel one after the other.
    ``base[kind]`` is the last id of that kind the kernel gave before the case began."""

    def __init__(self, base: dict[str, int] | None = None) -> None:
        self.base = {"pid": 0, "tid": 0, "eid": 0, "seq": 0, **(base or {})}

    def _map(self, value: Any, sign: int, top: bool = True) -> Any:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                kind = ID_FIELDS.get(k)
                if kind is not None and type(v) is int and (v >= 1 or (k in ZERO_OK and v == 0)):
                    out[k] = v + sign * self.base[kind]
                else:
                    out[k] = self._map(v, sign, False)
            return out
        if isinstance(value, list):
            return [self._map(v, sign, False) for v in value]
        return value

    def to_kernel(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._map(args, +1)

    def to_vector(self, reply: dict[str, Any]) -> dict[str, Any]:
        return self._map(reply, -1)

    @property
    def identity(self) -> bool:
        return not any(self.base.values())


__all__ = ["ID_FIELDS", "KEY_REF", "RESULT_FIELDS", "Ids", "client", "expected", "is_role", "resolve"]
