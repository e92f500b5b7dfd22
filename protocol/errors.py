"""Error values: a name, a number and a message (plus named details).

Numbers follow Jinue's ``errno.h``; EEXIST (15) is ours and means "frame
already kernel-owned". Inside the servers an error is an ``Error`` value
returned by the check phase; on the client side the same value arrives as a
``CallError`` exception.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Errno(enum.IntEnum):
    ENOMEM = 1
    ENOSYS = 2
    EINVAL = 3
    EAGAIN = 4
    EBADF = 5
    EIO = 6
    EPERM = 7
    E2BIG = 8
    ENOMSG = 9
    ENOTSUP = 10
    EBUSY = 11
    ESRCH = 12
    EDEADLK = 13
    EPROTO = 14
    EEXIST = 15


@dataclass(frozen=True)
class Error:
    """A refused call: ``code`` is the Errno, ``details`` are extra named fields."""

    code: Errno
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code.name, "errno": int(self.code), "message": self.message}
        for k, v in self.details.items():
            if k not in out:
                out[k] = v
        return out

    @classmethod
    def from_wire(cls, err: Any) -> "Error":
        if not isinstance(err, dict):
            return cls(Errno.EPROTO, f"malformed error in reply: {err!r}")
        try:
            code = Errno[err.get("code", "")]
        except KeyError:
            code = Errno.EPROTO
        details = {k: v for k, v in err.items() if k not in ("code", "errno", "message")}
        return cls(code, str(err.get("message", "")), details)


def error(code: Errno, message: str, **details: Any) -> Error:
    return Error(code, message, details)


class CallError(Exception):
    """Raised by ``Connection`` when a call is refused (or no reply comes)."""

    def __init__(self, err: Error, call: str = "") -> None:
        self.error = err
        self.call = call
        super().__init__(f"{call + ': ' if call else ''}{err.code.name} ({int(err.code)}): {err.message}")

    @property
    def code(self) -> Errno:
        return self.error.code

    @property
    def name(self) -> str:
        return self.error.code.name

    @property
    def errno(self) -> int:
        return int(self.error.code)

    @property
    def details(self) -> dict[str, Any]:
        return self.error.details
