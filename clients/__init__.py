"""Clients of the kernel and the memory manager, and the ``mmsim`` command line.

- ``cli``: the ``mmsim`` typer application (every command registers here).
"""
