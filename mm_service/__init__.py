"""The memory manager (mm): its own view of frame ownership, memory for clients, the kernel's pool kept supplied.

- ``records``: the journal records (one typed record per change of the view, one wire form).
- ``view``: the mm's view of every frame and client, changed only by records.
- ``placement``: which frames a request, a donation or a reclaim takes (pure).
- ``policy``: ``MMCore``, the requests, quotas and budget, the pool's watermarks, recovery (exact
  settlement with the kernel) and the audit, as sans-I/O operation generators.
- ``service``: ``MMService``, the envelope, validation, the replay cache (I12), compaction.
- ``health``: is the kernel there, and still the same boot?
- ``driver``: ``Driver``, the sans-I/O state machine that runs all of it with several client requests in
  flight (events in, actions out); the server and the simulator drive it with their own I/O.
- ``journal``: the durable journal (SQLite). ``server``: the ZeroMQ process. ``audit``, ``cli``: the
  ``mmsim audit`` and ``mmsim mm`` commands.

Nothing here imports the kernel: the mm talks to it only through the wire contract in ``protocol``.
"""
