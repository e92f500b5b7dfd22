"""Conformance tools for kernel implementers: test vectors and exhaustive small-scope checking.

Nothing here is on the kernel's hot path; the servers never import it.

- ``digest``: the portable state digest (SHA-256 over a documented byte layout), from a core or
  from what any kernel answers over the wire.
- ``normal``: roles instead of keys, the normative part of every reply, object-id translation.
- ``variants``: other free-list disciplines (which free kernel frame is handed out is each
  implementation's choice), so a vector asserts only what the design decides.
- ``cases``: steps and cases; recording a case's expectations on the core.
- ``scenarios``: hand-written cases from the call table (every rule, and rule pairs).
- ``walks``: cases drawn by the hypothesis state machine of the kernel's property tests.
- ``export``: the vector files and their schema; ``replay``: running them against a kernel.
- ``explore``: ``mmsim check``, breadth-first enumeration of every call sequence on a tiny machine;
  ``mutants``: cores with one planted bug each, which the checker must find.
"""
