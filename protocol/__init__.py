"""The wire contract shared by the kernel, the memory manager and clients.

- ``errors``: error names and numbers (Jinue's errno plus EEXIST) and the
  typed exception every caller sees.
- ``wire``: the msgpack envelope, size limits, encode/decode.
- ``runs``: frame runs ``[[first, count], ...]`` and helpers to build them.
- ``calls``: one strict pydantic model per call, validated by adapters built once.
- ``connection``: the small synchronous CURVE client (Lazy Pirate retries).
- ``keys``: key pairs and the run-directory layout.
"""

from protocol.errors import CallError, Errno, Error
from protocol.wire import PROTOCOL_VERSION

PROT_READ = 1
PROT_WRITE = 2
PROT_EXEC = 4

__all__ = ["CallError", "Errno", "Error", "PROTOCOL_VERSION", "PROT_READ", "PROT_WRITE", "PROT_EXEC"]
