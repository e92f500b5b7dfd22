"""The wire contract shared by the kernel, the memory manager and clients.

- ``errors``: error names and numbers (Jinue's errno plus EEXIST) and the
  typed exception every caller sees.
- ``wire``: the msgpack envelope, size limits, encode/decode.
- ``runs``: frame runs ``[[first, count], ...]`` and helpers to build them.
- ``calls``: one strict pydantic model per call, validated by adapters built once.
- ``connection``: the small synchronous CURVE client (Lazy Pirate retries).
- ``rundir``: the run directory's layout: key pairs, admitted keys, endpoints, ipc sockets, locks.
- ``serving``: the server side of a socket (CURVE ROUTER, ZAP admission, bounded replies).
- ``replay``: the at-most-once reply cache (I12).

The page size and the protection bits are defined here, once, for every part.
"""

from protocol.errors import CallError, Errno, Error
from protocol.wire import PROTOCOL_VERSION

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT  # every profile's small page (frames are PAGE_SIZE bytes)

PROT_READ = 1
PROT_WRITE = 2
PROT_EXEC = 4

__all__ = ["CallError", "Errno", "Error", "PROTOCOL_VERSION", "PAGE_SHIFT", "PAGE_SIZE", "PROT_READ", "PROT_WRITE",
           "PROT_EXEC"]
