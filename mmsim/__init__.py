"""The ``mmsim`` command and the operator's tools.

- ``cli``: the ``mmsim`` typer application (every command registers here).
- ``system``: the process supervisor (kernel, mm and clients as OS processes of one run).
- ``launcher``: ``mmsim up`` and ``mmsim status``.
- ``chaos``: ``mmsim chaos``, the system under seeded faults.
- ``picture``: the frame picture (terminal and SVG).
"""
