"""The msgpack envelope and its limits.

Request: ``{"v": 1, "id": <uint>, "call": "<name>", "args": {...}}``
Reply:   ``{"v": 1, "id": <same>, "ok": true, "result": {...}}`` or
         ``{"v": 1, "id": <same>, "ok": false, "error": {"code", "errno", "message", ...}}``

``parse_request`` never raises: undecodable or malformed input comes back as
an ``Error`` (EPROTO or E2BIG) so a server can answer it and carry on.

Bounded work: a request is at most ``MAX_REQUEST_BYTES`` (the largest legal
request, ``MAX_RUNS`` runs of 64-bit frame numbers, is about 20 KiB; a server
takes requests past ``MAX_CLIENT_REQUEST_BYTES`` only from the mm and the
operator: a client's largest legal request is under 2 KiB), and it
is decoded with msgpack's own limits (no array longer than ``MAX_RUNS``, no
map wider than ``MAX_MAP``, no string or binary longer than ``MAX_STR``;
nesting is bounded by the size), so what a request can make a server spend
before it is refused is a small constant. Replies are paginated to stay far
below ``MAX_REPLY_BYTES``.
"""

from __future__ import annotations

from typing import Any

import msgpack

from protocol.errors import Errno, Error

PROTOCOL_VERSION = 1
MAX_RUNS = 1024  # frame runs per call
MAX_REQUEST_BYTES = 32 << 10  # a larger request is refused (E2BIG)
MAX_CLIENT_REQUEST_BYTES = 4 << 10  # a larger request from anyone but the mm and the operator is refused (E2BIG)
MAX_TRANSPORT_BYTES = 2 * MAX_REQUEST_BYTES  # a server's socket drops a peer that sends more than this at once
MAX_REPLY_BYTES = 1 << 20  # a client's socket drops a server that answers with more than this
MAX_MAP = 32  # keys in any map of a request
MAX_STR = 256  # bytes in any string or binary of a request
REPLY_QUEUE = 4096  # replies a server queues for one peer; a peer that leaves more unread loses the rest
MAX_ID = (1 << 64) - 1
MAX_CALL_NAME = 32
REQUEST_KEYS = frozenset(("v", "id", "call", "args"))
_unpackb = msgpack.unpackb


def encode(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def decode(data: bytes) -> Any:
    """Decode a reply (or anything trusted)."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)


def decode_request(data: bytes) -> Any:
    """Decode a request with msgpack's limits (see the module docstring); raises on anything beyond them."""
    return _unpackb(data, raw=False, strict_map_key=False, use_list=True, max_array_len=MAX_RUNS,
                           max_map_len=MAX_MAP, max_str_len=MAX_STR, max_bin_len=MAX_STR, max_ext_len=0)


def request(req_id: int, call: str, args: dict[str, Any] | None = None) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": req_id, "call": call, "args": args or {}})


def ok_reply(req_id: int | None, result: dict[str, Any]) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "result": result})


def error_reply(req_id: int | None, err: Error) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "error": err.to_wire()})


class Replies:
    """Reply encoding for one server thread: ``ok(id, result)`` and ``error(id, err)`` as ``ok_reply`` and
    ``error_reply``, with a msgpack ``Packer`` made once (``packb`` makes one per call). Not thread-safe:
    one per serving thread."""

    def __init__(self) -> None:
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def __reduce__(self) -> tuple:  # a copy (pickled state, the exhaustive checker's) gets a packer of its own
        return (Replies, ())

    def ok(self, req_id: int | None, result: dict[str, Any]) -> bytes:
        return self._pack({"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "result": result})

    def error(self, req_id: int | None, err: Error) -> bytes:
        return self._pack({"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "error": err.to_wire()})


def parse_request(data: bytes) -> tuple[int | None, str, dict[str, Any]] | tuple[int | None, Error]:
    """Decode and check the envelope: ``(id, call, args)`` or ``(id_or_None, Error)``."""
    if len(data) > MAX_REQUEST_BYTES:
        return None, Error(Errno.E2BIG, f"message of {len(data)} bytes exceeds the limit of {MAX_REQUEST_BYTES}")
    try:
        msg = _unpackb(data, raw=False, strict_map_key=False, use_list=True, max_array_len=MAX_RUNS,
                       max_map_len=MAX_MAP, max_str_len=MAX_STR, max_bin_len=MAX_STR, max_ext_len=0)
    except Exception as exc:  # msgpack raises many types on garbage
        if isinstance(exc, ValueError) and " exceeds max_" in str(exc):  # a length beyond the limits
            return None, Error(Errno.E2BIG, f"message refused: {exc}")
        return None, Error(Errno.EPROTO, f"undecodable message: {type(exc).__name__}")
    if type(msg) is dict and len(msg) == 4:  # the usual envelope, all four fields: the checks below, at once
        try:
            v, req_id, call, args = msg["v"], msg["id"], msg["call"], msg["args"]
        except KeyError:
            pass
        else:
            if (type(req_id) is int and 0 <= req_id <= MAX_ID and type(v) is int and v == PROTOCOL_VERSION
                    and type(call) is str and 0 < len(call) <= MAX_CALL_NAME and type(args) is dict):
                return req_id, call, args
    return _envelope(msg)


def _envelope(msg: Any) -> tuple[int | None, str, dict[str, Any]] | tuple[int | None, Error]:
    """The envelope's checks, in order: the first one broken is the error."""
    if not isinstance(msg, dict):
        return None, Error(Errno.EPROTO, f"request must be a map, got {type(msg).__name__}")
    req_id = msg.get("id")
    if type(req_id) is not int or not 0 <= req_id <= MAX_ID:
        return None, Error(Errno.EPROTO, "field 'id': must be an unsigned integer")
    extra = set(msg) - REQUEST_KEYS
    if extra:
        return req_id, Error(Errno.EPROTO, f"unknown envelope field(s): {', '.join(sorted(map(str, extra)))}")
    if msg.get("v") != PROTOCOL_VERSION or type(msg.get("v")) is not int:
        return req_id, Error(Errno.EPROTO, f"field 'v': protocol version must be {PROTOCOL_VERSION}")
    call = msg.get("call")
    if type(call) is not str or not 0 < len(call) <= MAX_CALL_NAME:
        return req_id, Error(Errno.EPROTO, "field 'call': must be a call name (string)")
    args = msg.get("args", {})
    if type(args) is not dict:
        return req_id, Error(Errno.EPROTO, "field 'args': must be a map")
    return req_id, call, args


def parse_reply(data: bytes) -> dict[str, Any]:
    """Decode a reply; raises ValueError if it is not a well-formed reply."""
    msg = decode(data)
    if not isinstance(msg, dict) or "ok" not in msg or "id" not in msg:
        raise ValueError("malformed reply")
    return msg
