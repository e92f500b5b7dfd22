"""``mmsim keys``: key pairs and admission, the operator's acts on a run directory.

``init`` makes the kernel's, the mm's and the operator's key pairs and N
admitted client key pairs; ``admit`` lets a client key in (optionally with
its own quotas), ``revoke`` takes it back, ``list`` shows who is who. The
servers re-read the admitted keys while they run: an admission counts for
the next connection, without a restart, and a revocation refuses the next
connection of that key (connections already made stay until they close).
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from mmsim import options

keys_app = typer.Typer(help="Key pairs (CURVE identities) and admission in a run directory: init, admit, revoke, "
                            "list. The servers re-read the admitted keys while they run.", no_args_is_help=True)

_RUN = "Run directory (default: " + options.DEFAULT_RUN_DIR + ")."


def _fail(message: str, hint: str | None = None) -> None:
    raise typer.BadParameter(message, param_hint=hint)


@keys_app.command("init")
def keys_init(
    run_dir: str = typer.Argument(options.DEFAULT_RUN_DIR, help="Run directory; keys go to RUN/keys/ (made if "
                                  "missing).", callback=options.dir_callback("RUN")),
    clients: int = typer.Option(4, "--clients", min=0, max=4096, help="How many admitted client key pairs "
                                "(client-0, client-1, ...)."),
    force: bool = typer.Option(False, "--force", help="Replace existing key pairs (a running system stops "
                               "recognising its peers)."),
) -> None:
    """Make the kernel's, the mm's and the operator's key pairs, and N client key pairs, admitted."""
    from protocol import rundir

    options.make_dir(run_dir, "RUN")
    if force and rundir.running(run_dir):
        _fail(f"a system is running in {run_dir} ({', '.join(rundir.running(run_dir))}); replacing its keys "
              "would cut it off: stop it first", "--force")
    before = set(rundir.names(run_dir))
    made = rundir.init(run_dir, clients=clients, overwrite=force)
    for name, pub in made.items():
        role = {"kernel": "kernel", "mm": "memory manager", "operator": "operator (status, audit; always admitted)"}
        what = role.get(name, "client, admitted")
        fresh = "new" if force or name not in before else "kept"
        typer.echo(f"{name:<10} {pub}  {fresh:<4}  {what}")
    typer.echo(f"{len(made)} key pair(s) in {rundir.keys_dir(run_dir)}: kernel, mm, operator and {clients} admitted "
               f"client(s); admit more with `mmsim keys admit {run_dir} NAME`")


@keys_app.command("admit")
def keys_admit(
    run_dir: str = typer.Argument(..., help=_RUN, callback=options.run_dir_callback("RUN")),
    name: str = typer.Argument(..., help="The client's name (letters, digits, '_', '.', '-'). Without --key, its "
                               "key pair RUN/keys/NAME is used, made if missing."),
    key: Optional[str] = typer.Option(None, "--key", help="Admit this Z85 public key (40 characters) under NAME: "
                                      "the client keeps its secret key elsewhere."),
    quota: Optional[int] = typer.Option(None, "--quota", min=1, help="User pages this client may hold "
                                        "(default: the mm's)."),
    kernel_quota: Optional[int] = typer.Option(None, "--kernel-quota", min=1, help="Kernel frames this client "
                                               "may cause (default: the mm's)."),
) -> None:
    """Admit a client key: the servers serve it from its next connection on, without a restart."""
    from protocol import rundir

    try:
        rundir.check_key(key) if key is not None else None
    except ValueError as exc:
        _fail(str(exc), "--key")
    made = ""
    try:
        if key is None and name not in rundir.names(run_dir):
            rundir.generate(run_dir, name)
            made = "made key pair and "
        grant = rundir.admit(run_dir, name, key=key, quota=quota, kernel_quota=kernel_quota)
    except ValueError as exc:
        _fail(str(exc), "NAME")
    quotas = ", ".join(f"{k} {v}" for k, v in (("quota", grant.quota), ("kernel quota", grant.kernel_quota)) if v)
    typer.echo(f"{made}admitted {grant.name} {grant.key}" + (f" ({quotas})" if quotas else " (the mm's default quotas)"))


@keys_app.command("revoke")
def keys_revoke(
    run_dir: str = typer.Argument(..., help=_RUN, callback=options.run_dir_callback("RUN")),
    name: str = typer.Argument(..., help="The admitted client's name."),
) -> None:
    """Take back a client's admission: its next connection is refused (connections already made stay until
    they close; its process ends with its lease)."""
    from protocol import rundir

    try:
        gone = rundir.revoke(run_dir, name)
    except ValueError as exc:
        _fail(str(exc), "NAME")
    if not gone:
        names = sorted(g.name for g in rundir.admitted(run_dir).values())
        _fail(f"{name!r} is not admitted in {run_dir}" + (f" (admitted: {', '.join(names)})" if names else
                                                           " (nobody is)"), "NAME")
    typer.echo(f"revoked {name}: its next connection is refused")


@keys_app.command("list")
def keys_list(
    run_dir: str = typer.Argument(options.DEFAULT_RUN_DIR, help=_RUN, callback=options.run_dir_callback("RUN")),
    json_out: bool = typer.Option(False, "--json", help="One JSON list of {name, key, role, admitted, quota, "
                                  "kernel_quota}."),
) -> None:
    """Every key of the run: servers, the operator, admitted clients (with their quotas) and key pairs that
    are not admitted."""
    from protocol import rundir

    rows = key_rows(run_dir)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"keys of {run_dir}", title_justify="left")
    for col in ("name", "key", "role", "admitted", "quota", "kernel quota"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["key"] or "-", r["role"], r["admitted"], "-" if r["quota"] is None else str(r["quota"]),
                  "-" if r["kernel_quota"] is None else str(r["kernel_quota"]))
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    console.print(t)
    typer.echo(f"{sum(1 for r in rows if r['admitted'] == 'yes')} admitted client(s); admission is read from "
               f"{rundir.admitted_dir(run_dir)}")


def key_rows(run_dir: str) -> list[dict]:
    """The rows of ``keys list``: every key pair and every admitted key of a run directory."""
    from protocol import rundir

    grants = {g.name: g for g in rundir.admitted(run_dir).values()}
    rows = []
    for name in sorted(set(rundir.names(run_dir)) | set(grants), key=lambda n: (n not in rundir.SERVERS, n)):
        g = grants.get(name)
        try:
            pair: str | None = rundir.public_key(run_dir, name).decode()
        except FileNotFoundError:
            pair = None
        if name in rundir.SERVERS:
            key = pair
            role, admitted = ("operator", "always") if name == "operator" else ("server", "itself")
        else:
            role, key = "client", g.key if g else pair
            admitted = "no" if g is None else "yes" if pair in (None, g.key) else "yes (not its key pair's key)"
        rows.append({"name": name, "key": key, "role": role, "admitted": admitted,
                     "quota": g.quota if g else None, "kernel_quota": g.kernel_quota if g else None})
    return rows
