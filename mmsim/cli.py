"""The ``mmsim`` command line: one typer app; each command lives with the part it starts.

Commands are registered by name and loaded when used (``LazyGroup``): ``mmsim
--help`` lists them from the short texts below without importing numpy, zmq,
pydantic or the cores, and ``mmsim kernel ...`` imports only what the kernel
needs. Every usage error is one line on stderr (``mmsim CMD: what is wrong``)
with exit status 2, never a traceback; Ctrl-C is exit 130.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.2x vendors click; older typer uses click itself
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click  # type: ignore[no-redef]


@dataclass(frozen=True)
class Lazy:
    """A command loaded on first use: ``target`` is ``module:attribute`` (a typer command function or
    a ``typer.Typer`` group), ``help`` optionally ``module:attribute`` of its full help text."""

    target: str
    short: str
    help: Optional[str] = None

    def load(self, name: str) -> Any:
        mod, attr = self.target.split(":")
        obj = getattr(importlib.import_module(mod), attr)
        if isinstance(obj, typer.Typer):
            cmd = typer.main.get_group(obj)
        else:
            text = None
            if self.help is not None:
                hmod, hattr = self.help.split(":")
                text = getattr(importlib.import_module(hmod), hattr)
            one = typer.Typer(add_completion=False)
            one.command(name, help=text)(obj)
            cmd = typer.main.get_command(one)
        cmd.name = name
        cmd.short_help = self.short
        return cmd


class LazyGroup(TyperGroup):
    """A typer group whose commands (``lazy``, set by ``lazy_group``) are imported when first used.
    Its help lists them from their short texts, importing nothing."""

    lazy: dict[str, Lazy] = {}
    _describing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands) + [n for n in self.lazy if n not in self.commands]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = self.commands.get(cmd_name)
        if cmd is not None:
            return cmd
        spec = self.lazy.get(cmd_name)
        if spec is None:
            return None
        if self._describing:  # listing for --help: a stand-in with the short text, nothing imported
            return TyperCommand(cmd_name, short_help=spec.short, help=spec.short)
        cmd = spec.load(cmd_name)
        self.commands[cmd_name] = cmd
        return cmd

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._describing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._describing = False

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click.exceptions.UsageError as e:  # suggest among the lazy names too
            from difflib import get_close_matches

            if args and "Did you mean" not in e.message:
                close = get_close_matches(args[0], self.list_commands(ctx))
                if close:
                    e.message = e.message.rstrip(".") + f". Did you mean {', '.join(repr(c) for c in close)}?"
            raise


def lazy_group(**commands: Lazy) -> type[LazyGroup]:
    return type("LazyGroup", (LazyGroup,), {"lazy": commands})


class Root(LazyGroup):
    """The ``mmsim`` group: runs a command and turns every usage error into one line on stderr."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        prog_name = prog_name or "mmsim"
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # `mmsim client`: the group's help
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.ClickException as e:
            sys.exit(_one_line_error(e, prog_name))
        except (typer.Abort, KeyboardInterrupt):
            typer.echo(f"{prog_name}: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # `mmsim keys list | head`
            sys.stderr = open(os.devnull, "w")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _one_line_error(e: Any, prog_name: str) -> int:
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else prog_name
    message = " ".join(str(e.format_message()).split())  # one line, whatever the message held
    message = message.replace(": Value error, ", ": ")  # pydantic's prefix on typer's conversion errors
    hint = f" (see '{path} --help')" if isinstance(e, click.exceptions.UsageError) else ""
    typer.echo(f"{path}: {message}{hint}", err=True)
    return int(getattr(e, "exit_code", 2) or 2)


ROOT_COMMANDS = dict(
    up=Lazy("mmsim.launcher:up", "The whole system (kernel, mm, workload clients) for a while, live frame picture, "
            "then stop, audit and summarise.", "mmsim.launcher:UP_HELP"),
    status=Lazy("mmsim.launcher:status", "The frame picture of a running system, once (or as SVG, or JSON).",
                "mmsim.launcher:STATUS_HELP"),
    audit=Lazy("mm_service.cli:audit", "Compare the mm's view with the kernel's frame by frame (exit 1 on a "
               "divergence)."),
    view=Lazy("mmsim.view:view_cmd", "One self-contained HTML frame map of a running system, a run's history or "
              "a simulator seed.", "mmsim.view:VIEW_HELP"),
    chaos=Lazy("mmsim.chaos:chaos", "The system under workload with seeded faults (kill -9, SIGSTOP, lying "
               "clients); audits and leak checks.", "mmsim.chaos:CHAOS_HELP"),
    sim=Lazy("simulator.cli:sim", "Deterministic simulation of the whole system in one process over many seeds.",
             "simulator.cli:SIM_HELP"),
    swarm=Lazy("simulator.swarm_cli:swarm_app", "Many simulator seeds on every core or a Dask cluster: a seed "
                "database of fingerprinted failures, coverage probes, shrinking to minimal capsules."),
    keys=Lazy("mmsim.keys:keys_app", "Key pairs and admission: init, admit, revoke, list."),
    ping=Lazy("mmsim.ping:ping", "Does the kernel or the mm of a run answer? (exit 0 yes, 1 no; a health check)",
              "mmsim.ping:PING_HELP"),
    kernel=Lazy("kernel_server.cli:kernel", "Start the kernel process.", "kernel_server.cli:KERNEL_HELP"),
    mm=Lazy("mm_service.cli:mm", "Start the memory manager (mm) process.", "mm_service.cli:MM_HELP"),
    client=Lazy("mmsim.cli:client_app", "Client processes: workload runners and lying clients."),
    vectors=Lazy("kernel_server.conformance.cli:vectors_app", "Kernel test vectors: export them, or run them "
                 "against a kernel (in-process, a kernel process, any wire-protocol endpoint)."),
    check=Lazy("kernel_server.conformance.cli:check", "Every sequence of kernel calls on a tiny machine, "
               "breadth-first, every invariant after every step (planted bugs: --bug).",
               "kernel_server.conformance.cli:CHECK_HELP"),
    bench=Lazy("bench.cli:bench_app", "Benchmarks: each figure a ratio against a floor measured in the same run."),
)

client_app = typer.Typer(cls=lazy_group(
    run=Lazy("clients.runner:run_cmd", "Run a workload client process.", "clients.runner:RUN_HELP"),
    attack=Lazy("clients.attacks:attack_cmd", "Lie to the kernel and the mm; exit 0 if every lie is refused.",
                "clients.attacks:ATTACK_HELP"),
), help="Client processes: workload runners and lying clients.", no_args_is_help=True)


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("mmsim")
        except PackageNotFoundError:
            v = "unknown (not installed)"
        typer.echo(f"mmsim {v}")
        raise typer.Exit(0)


app = typer.Typer(
    name="mmsim",
    cls=type("Root", (Root,), {"lazy": ROOT_COMMANDS}),
    help="An executable, multi-process model of a microkernel's physical-memory ownership design. "
         "Start with `mmsim up`; every command has --help.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """An executable, multi-process model of a microkernel's physical-memory ownership design."""


def command() -> Any:
    """The ``mmsim`` click command (for tests: ``CliRunner().invoke(command(), args)``)."""
    return typer.main.get_command(app)


def main(args: Optional[Sequence[str]] = None) -> None:
    command().main(args, prog_name="mmsim")


if __name__ == "__main__":
    main()
