"""The ``mmsim`` command line: one typer app; each command lives with the part it starts.

Commands import their heavy modules lazily, so ``mmsim --help`` is quick.
"""

from __future__ import annotations

import typer

from bench.cli import bench_app
from clients.attacks import ATTACK_HELP, attack_cmd
from mmsim.chaos import CHAOS_HELP, chaos
from mmsim.launcher import STATUS_HELP, UP_HELP, status, up
from mmsim.view import VIEW_HELP, view_cmd
from clients.runner import RUN_HELP, run_cmd
from simulator.cli import SIM_HELP, sim
from kernel_server.cli import KERNEL_HELP, kernel
from mm_service.cli import MM_HELP, audit, mm

app = typer.Typer(
    name="mmsim",
    help="An executable, multi-process model of a microkernel's physical-memory ownership design.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Key pairs (CURVE identities) in a run directory.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(bench_app, name="bench")


@keys_app.command("init")
def keys_init(
    run_dir: str = typer.Argument(..., help="Run directory; keys go to RUN/keys/."),
    clients: int = typer.Option(4, "--clients", min=0, help="How many client key pairs (client-0, client-1, ...)."),
    force: bool = typer.Option(False, "--force", help="Replace existing key pairs (a running system stops "
                               "recognising its peers)."),
) -> None:
    """Write kernel, mm and client key pairs (zmq.auth certificates) into RUN/keys/."""
    from protocol import rundir

    made = rundir.init(run_dir, clients=clients, overwrite=force)
    for name, pub in made.items():
        typer.echo(f"{name:<12} {pub}")
    typer.echo(f"{len(made)} key pair(s) in {rundir.keys_dir(run_dir)}")


client_app = typer.Typer(help="Client processes: workload runners and lying clients.", no_args_is_help=True)
app.add_typer(client_app, name="client")
client_app.command("run", help=RUN_HELP)(run_cmd)
client_app.command("attack", help=ATTACK_HELP)(attack_cmd)

app.command("kernel", help=KERNEL_HELP)(kernel)
app.command("mm", help=MM_HELP)(mm)
app.command("audit")(audit)
app.command("up", help=UP_HELP)(up)
app.command("status", help=STATUS_HELP)(status)
app.command("view", help=VIEW_HELP)(view_cmd)
app.command("chaos", help=CHAOS_HELP)(chaos)
app.command("sim", help=SIM_HELP)(sim)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
