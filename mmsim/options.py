"""What every ``mmsim`` command shares: its choices (enums), sizes, the run directory and its checks.

Choices are enums, so ``--help`` lists them and a wrong one is a usage error
naming the choices. Sizes are parsed in one place (``parse_size``, pydantic's
``ByteSize``): SI units are powers of 1000 (``1G`` = 10^9 bytes), IEC units
powers of 1024 (``1GiB``); RAM sizes are rounded down to whole 4 KiB pages
(``parse_memory``). Every command that takes a run directory defaults to
``DEFAULT_RUN_DIR`` and checks it with ``existing_run_dir`` (a run that has
keys) or ``make_dir`` (one it may create), so a bad path is a one-line usage
error, never a traceback.

This module imports nothing heavy at import time: ``mmsim --help`` loads it.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Any, Optional

import typer

DEFAULT_RUN_DIR = "./mmsim-run"
RUN_DIR_HELP = ("Run directory (keys, endpoints, locks, logs, report.json); every command defaults to "
                f"{DEFAULT_RUN_DIR}.")


class Arch(str, Enum):
    """Architecture profiles of the kernel (``kernel_server.arch.PROFILES``)."""

    i686 = "i686"
    i686_pae = "i686-pae"
    x86_64 = "x86_64"


class SimArch(str, Enum):
    """The simulator's profiles: one of the kernel's, or ``any`` (each seed picks)."""

    any = "any"
    i686 = "i686"
    i686_pae = "i686-pae"
    x86_64 = "x86_64"


class Transport(str, Enum):
    ipc = "ipc"
    tcp = "tcp"


class LogLevel(str, Enum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class Workload(str, Enum):
    """The workload generators (``clients.workloads.WORKLOADS``)."""

    steady = "steady"
    sparse = "sparse"
    kobjects = "kobjects"
    sharer = "sharer"


class Placement(str, Enum):
    """How the mm places allocations (``mm_service.policy.Config.placement``)."""

    pageblock = "pageblock"
    first_fit = "first-fit"


class Server(str, Enum):
    kernel = "kernel"
    mm = "mm"


def value(choice: Any) -> Any:
    """The plain value of an enum choice (or the value itself)."""
    return choice.value if isinstance(choice, Enum) else choice


# ---- sizes ---------------------------------------------------------------------------------------

PAGE = 4096  # protocol.PAGE_SIZE, not imported here to keep `mmsim --help` light (a test checks they agree)


def parse_size(text: str) -> int:
    """Bytes from ``"256MiB"``, ``"4GiB"``, ``"1G"`` (10^9), ``"65536"``; ValueError (one line) if it is
    not a positive size."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        n = int(TypeAdapter(ByteSize).validate_python(str(text)))
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"] if exc.errors() else "not a size"
        raise ValueError(f"bad size {text!r}: {reason}; use e.g. 256MiB, 4GiB, 1G or a number of bytes") from None
    if n <= 0:
        raise ValueError(f"bad size {text!r}: must be more than 0 bytes")
    return n


def parse_memory(text: str) -> int:
    """A RAM size in bytes, rounded down to whole pages (at least one)."""
    n = parse_size(text) // PAGE * PAGE
    if n <= 0:
        raise ValueError(f"bad size {text!r}: less than one {PAGE}-byte page")
    return n


def size_callback(hint: str, memory: bool = False):
    """A typer option callback that checks a size at parse time (the option keeps its text)."""

    def check(v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        try:
            (parse_memory if memory else parse_size)(v)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=hint) from None
        return v

    return check


# ---- run directories and paths ------------------------------------------------------------------

def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def creatable_dir_problem(path: str) -> str | None:
    """Why ``path`` cannot be (or become) a directory this process writes in, or None if it can.
    Looks only; creates nothing."""
    if not path:
        return "the path is empty"
    if "\0" in path:
        return "the path contains a NUL byte"
    p = os.path.abspath(path)
    if os.path.exists(p):
        if not os.path.isdir(p):
            return f"{path} exists and is not a directory"
        if not os.access(p, os.W_OK | os.X_OK):
            return f"{path} is not writable"
        return None
    base = _nearest_existing(p)
    if not os.path.isdir(base):
        return f"{base} is not a directory"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"cannot create {path}: {base} is not writable"
    return None


def make_dir(path: str, hint: str = "--run-dir") -> str:
    """Create directory ``path`` (and its parents) if missing; a one-line usage error if it cannot be."""
    problem = creatable_dir_problem(path)
    if problem is None:
        try:
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                problem = f"{path} is not writable"
        except OSError as exc:
            problem = f"cannot create {path}: {exc.strerror or exc}"
    if problem is not None:
        raise typer.BadParameter(problem, param_hint=hint)
    return path


def dir_callback(hint: str = "--run-dir"):
    """A typer option callback: the path must be a directory this process can create or write in
    (nothing is created at parse time)."""

    def check(v: Optional[str]) -> Optional[str]:
        if v is not None:
            problem = creatable_dir_problem(v)
            if problem is not None:
                raise typer.BadParameter(problem, param_hint=hint)
        return v

    return check


def run_dir_problem(path: str) -> str | None:
    """Why ``path`` is not the run directory of a system (one with keys), or None."""
    if not path or "\0" in path:
        return "not a path"
    if not os.path.exists(path):
        return f"{path} does not exist (start a system there first: mmsim up, or mmsim kernel --run-dir {path})"
    if not os.path.isdir(path):
        return f"{path} is not a directory"
    if not os.path.isdir(os.path.join(path, "keys")):
        return (f"{path} is not a run directory (it has no keys/): start a system there first "
                f"(mmsim up, or mmsim kernel --run-dir {path}), or mmsim keys init {path}")
    return None


def existing_run_dir(path: str, hint: str = "--run-dir") -> str:
    problem = run_dir_problem(path)
    if problem is not None:
        raise typer.BadParameter(problem, param_hint=hint)
    return path


def run_dir_callback(hint: str = "--run-dir"):
    """A typer option callback: the path must be an existing run directory (with keys/)."""

    def check(v: Optional[str]) -> Optional[str]:
        return v if v is None else existing_run_dir(v, hint)

    return check


def file_callback(hint: str):
    """A typer option callback: a file this process can write (its directory exists and is writable)."""

    def check(v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        if not v or "\0" in v:
            raise typer.BadParameter("not a path", param_hint=hint)
        if os.path.isdir(v):
            raise typer.BadParameter(f"{v} is a directory", param_hint=hint)
        parent = os.path.dirname(os.path.abspath(v))
        if not os.path.isdir(parent):
            raise typer.BadParameter(f"{parent} is not a directory", param_hint=hint)
        if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(v) and not os.access(v, os.W_OK)):
            raise typer.BadParameter(f"cannot write {v}: permission denied", param_hint=hint)
        return v

    return check


def endpoint_callback(hint: str):
    """A typer option callback: ``ipc://PATH`` or ``tcp://HOST:PORT`` (``*`` allowed as a bind port)."""
    import re

    def check(v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        if v.startswith("ipc://") and len(v) > len("ipc://"):
            if len(v) - len("ipc://") > 107:
                raise typer.BadParameter(f"ipc path longer than 107 bytes: {v}", param_hint=hint)
            return v
        m = re.fullmatch(r"tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.*-]+):(\d+|\*)", v)
        if m is None or (m.group(2) != "*" and not 0 < int(m.group(2)) < 65536):
            raise typer.BadParameter(f"{v!r} is not an endpoint: use ipc://PATH or tcp://HOST:PORT", param_hint=hint)
        return v

    return check
