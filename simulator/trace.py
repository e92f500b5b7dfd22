"""The run's trace: every call (caller, target, request id, call, arguments, reply) and every fault.

With a sink (``--trace FILE``) each entry is written as one JSON line as it
happens; lines hold only seed-determined values (simulated time, short names
of identities, decoded wire bytes), so two runs of one seed write
byte-identical files (``HashSink`` keeps only their hash, to compare two runs).
Without a sink only the last entries are kept, raw, and rendered when a
violation is reported (rendering costs nothing per step).
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from typing import IO, Any, Callable

from protocol import wire

TAIL = 20
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=lambda o: (
    o.hex() if isinstance(o, (bytes, bytearray)) else repr(o)))


def _request(data: bytes) -> dict[str, Any]:
    try:
        msg = wire.decode(data)
    except Exception:  # noqa: BLE001 - garbage bytes (a lie) raise whatever msgpack raises
        msg = None
    if isinstance(msg, dict) and "call" in msg and len(data) <= 65536:
        return {"id": msg.get("id"), "call": msg.get("call"), "args": msg.get("args")}
    return {"id": msg.get("id") if isinstance(msg, dict) else None, "call": "?",
            "args": {"raw": data[:48].hex(), "bytes": len(data)}}


def _reply(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        msg = wire.decode(data)
    except Exception:  # noqa: BLE001 - as above
        return {"raw": data[:48].hex()}
    if isinstance(msg, dict):
        return {k: v for k, v in msg.items() if k not in ("v", "id")}
    return {"raw": repr(msg)}


class HashSink:
    """A trace sink that keeps only the SHA-256 of what is written (to compare two runs of a seed)."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.lines = 0

    def write(self, text: str) -> int:
        self.h.update(text.encode("ascii"))
        self.lines += 1
        return len(text)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


class Trace:
    def __init__(self, names: dict[str, str], sink: IO[str] | None = None, tail: int = TAIL,
                 listener: Callable[[str], None] | None = None) -> None:
        self.names = names  # identity -> short name (c3, c3-peer, mm, ...)
        self.sink = sink
        self.listener = listener  # gets every entry rendered (the view recorder's events)
        self.ring: deque[tuple[Any, ...]] = deque(maxlen=tail)
        self.entries = 0

    def name(self, identity: str | None) -> str:
        if identity is None:
            return "?"
        return self.names.get(identity, identity[:8])

    # ---- recording --------------------------------------------------------------

    def call(self, step: int, t: int, identity: str | None, target: str, data: bytes, reply: bytes | None,
             cached: bool) -> None:
        entry = ("call", step, t, identity, target, data, reply, cached)
        self.entries += 1
        self.ring.append(entry)
        if self.sink is not None:
            self.sink.write(_JSON.encode(self._dict(entry)) + "\n")
        if self.listener is not None:
            self.listener(self.render(entry, 240))

    def event(self, step: int, t: int, kind: str, **fields: Any) -> None:
        entry = ("event", step, t, kind, fields)
        self.entries += 1
        self.ring.append(entry)
        if self.sink is not None:
            self.sink.write(_JSON.encode(self._dict(entry)) + "\n")
        if self.listener is not None:
            self.listener(self.render(entry, 240))

    def header(self, **fields: Any) -> None:
        if self.sink is not None:
            self.sink.write(_JSON.encode({"ev": "start", **fields}) + "\n")

    # ---- rendering --------------------------------------------------------------

    def _dict(self, entry: tuple[Any, ...]) -> dict[str, Any]:
        if entry[0] == "call":
            _, step, t, identity, target, data, reply, cached = entry
            d: dict[str, Any] = {"step": step, "t": t, "ev": "call", "from": self.name(identity), "to": target}
            d.update(_request(data))
            d["reply"] = _reply(reply)
            if cached:
                d["cached"] = True
            return d
        _, step, t, kind, fields = entry
        return {"step": step, "t": t, "ev": kind, **fields}

    def render(self, entry: tuple[Any, ...], width: int = 180) -> str:
        d = self._dict(entry)
        head = f"{d['step']:>7} {d['t'] / 1000:10.3f}ms "
        if d["ev"] == "call":
            r = d["reply"]
            if r is None:
                out = "(no reply)"
            elif r.get("ok") is True:
                out = "ok " + _JSON.encode(r.get("result"))
            elif isinstance(r.get("error"), dict):
                e = r["error"]
                out = f"{e.get('code')}: {e.get('message')}"
            else:
                out = _JSON.encode(r)
            line = (f"{head}{d['from']}->{d['to']} {d['call']}#{d['id']} {_JSON.encode(d['args'])} => "
                    f"{out}{' (cached)' if d.get('cached') else ''}")
        else:
            rest = {k: v for k, v in d.items() if k not in ("step", "t", "ev")}
            line = f"{head}{d['ev'].upper()} {_JSON.encode(rest)}"
        return line if len(line) <= width else line[: width - 3] + "..."

    def tail(self, n: int = TAIL) -> list[str]:
        return [self.render(e) for e in list(self.ring)[-n:]]
