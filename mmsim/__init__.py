"""The ``mmsim`` command and the operator's tools.

- ``cli``: the ``mmsim`` typer application (every command registers here, loaded when used).
- ``options``: what every command shares: choices (enums), sizes, the run directory and its checks.
- ``system``: the process supervisor (kernel, mm and clients as OS processes of one run).
- ``launcher``: ``mmsim up`` and ``mmsim status``.
- ``chaos``: ``mmsim chaos``, the system under seeded faults.
- ``keys``: ``mmsim keys``: key pairs and admission.
- ``ping``: ``mmsim ping``: does a server answer (health checks).
- ``picture``: the frame picture (terminal and SVG).
"""
