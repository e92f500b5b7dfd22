"""``mmsim ping``: does the kernel or the mm of a run answer? A cheap health check.

It says ``hello`` as the operator (always admitted) and waits for one answer.
Exit 0: it answered; 1: it did not (not running, or no answer within
``--timeout``); 2: bad options. With the run directory's own endpoint, a
server that is not running is known at once from its lock, without waiting.
"""

from __future__ import annotations

import json
import time
from typing import Optional

import typer

from mmsim import options

PING_HELP = ("Say hello to the kernel or the mm of a run as the operator; exit 0 if it answers, 1 if it does not "
             "(at once when its lock shows it is not running), 2 on bad options. Meant for health checks.")


def ping(
    server: options.Server = typer.Argument(..., help="Which server: kernel or mm."),
    run_dir: str = typer.Option(options.DEFAULT_RUN_DIR, "--run-dir", help=options.RUN_DIR_HELP,
                                callback=options.run_dir_callback()),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Its endpoint (default: the one it published "
                                           "in the run directory).", callback=options.endpoint_callback("--endpoint")),
    timeout: float = typer.Option(2.0, "--timeout", min=0.05, max=600.0, help="Seconds to wait for the answer."),
    json_out: bool = typer.Option(False, "--json", help="Print the answer (or the failure) as one JSON object."),
) -> None:
    """Does the kernel or the mm answer?"""
    name = options.value(server)
    ok, line, data = check(run_dir, name, endpoint, timeout)
    if json_out:
        typer.echo(json.dumps({"server": name, "ok": ok, "message": line, "hello": data}, default=str))
    else:
        typer.echo(line, err=not ok)
    raise typer.Exit(0 if ok else 1)


def check(run_dir: str, name: str, endpoint: str | None = None, timeout: float = 2.0) -> tuple[bool, str, dict | None]:
    """(answered, one line saying so, the hello result)."""
    from protocol import rundir

    if endpoint is None:
        if not rundir.held(run_dir, name):
            return False, f"the {name} of {run_dir} is not running (nothing holds {rundir.lock_path(run_dir, name)})", None
        try:
            endpoint = rundir.read_endpoint(run_dir, name)
        except FileNotFoundError:
            return False, f"the {name} of {run_dir} is starting: it has not published its endpoint yet", None
    try:
        pub, sec = rundir.load_keypair(run_dir, "operator")
        server_key = rundir.public_key(run_dir, name)
    except FileNotFoundError as exc:
        return False, f"cannot say hello as the operator: {exc}", None
    from protocol.connection import Connection
    from protocol.errors import CallError

    began = time.monotonic()
    with Connection(endpoint, server_key, pub, sec, timeout=timeout, retries=0) as conn:
        try:
            hello = conn.call("hello")
        except CallError as exc:
            return False, f"the {name} at {endpoint} did not answer: {exc}", None
    ms = (time.monotonic() - began) * 1000
    return True, f"the {name} at {endpoint} answered hello in {ms:.1f} ms", hello
