"""The ``mmsim mm`` and ``mmsim audit`` commands."""

from __future__ import annotations

import logging
from typing import Optional

import typer

from mmsim import options
from mmsim.options import LogLevel, Placement

MM_HELP = "Start the memory manager: its own view of frame ownership, client memory service, kernel pool upkeep."


def mm(
    kernel: Optional[str] = typer.Option(None, "--kernel", help="Kernel endpoint (default: read RUN/kernel.endpoint).",
                                         callback=options.endpoint_callback("--kernel")),
    bind: Optional[str] = typer.Option(None, "--bind", help="Endpoint for clients, ipc://... or tcp://... "
                                       "(default: an ipc socket under /tmp for this run directory).",
                                       callback=options.endpoint_callback("--bind")),
    run_dir: str = typer.Option(options.DEFAULT_RUN_DIR, "--run-dir", help="Run directory with keys/ (made by `mmsim "
                                "keys init` or the kernel); the journal mm.db is kept here.",
                                callback=options.run_dir_callback()),
    low: int = typer.Option(64, "--low", min=0, help="Donate to the kernel when its free pool drops below this many frames."),
    target: int = typer.Option(256, "--target", min=0, help="Pool size donations and reclaims aim for (frames)."),
    high: int = typer.Option(1024, "--high", min=0, help="Reclaim from the kernel when its pool exceeds this many frames."),
    quota: Optional[int] = typer.Option(None, "--quota", min=1, help="User pages one client may map (default: an equal "
                                        "share of what exists for --room clients, less the kernel quota). An admitted "
                                        "key's certificate may name its own (metadata quota)."),
    kernel_quota: Optional[int] = typer.Option(None, "--kernel-quota", min=1, help="Kernel frames one client's process "
                                               "may cause: address space, page tables, threads, endpoints (default 64, "
                                               "less on a very small machine; metadata kernel_quota overrides it)."),
    room: int = typer.Option(16, "--room", min=1, help="Clients the default quotas leave room for. The mm never grants "
                             "more than exists: a client it cannot grant its quotas gets ENOMEM on its first request."),
    fsync: bool = typer.Option(False, "--fsync", help="fsync the journal on every commit (survive power loss, not just kill -9)."),
    compact_every: int = typer.Option(2000, "--compact-every", min=1, help="Journal ops between snapshots (compaction): "
                                      "a restart replays at most about this many ops."),
    placement: Placement = typer.Option(Placement.pageblock, "--placement", help="Where allocations go: pageblock "
                                        "keeps large-page-aligned runs intact; first-fit is the naive comparison."),
    log_level: LogLevel = typer.Option(LogLevel.INFO, "--log-level", case_sensitive=False,
                                       help="DEBUG shows every refused request."),
) -> None:
    """Start the memory manager (mm) process."""
    from mm_service.policy import Config
    from mm_service.server import MMOptions, run
    from protocol import rundir

    cfg = Config(low=low, target=target, high=high, quota=quota, kernel_quota=kernel_quota, room=room,
                 compact_every=compact_every, placement=options.value(placement))
    try:
        cfg.check()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--low/--target/--high") from None
    if kernel is None:
        if not rundir.held(run_dir, "kernel"):  # known at once: no need to wait for a kernel that is not there
            raise typer.BadParameter(f"no kernel is running in {run_dir} (nothing holds "
                                     f"{rundir.lock_path(run_dir, 'kernel')}): start `mmsim kernel --run-dir "
                                     f"{run_dir}` first, or give --kernel", param_hint="--kernel")
        try:
            kernel = rundir.read_endpoint(run_dir, "kernel")
        except FileNotFoundError as exc:
            raise typer.BadParameter(f"the kernel has not published its endpoint yet: {exc}",
                                     param_hint="--kernel") from None
    logging.basicConfig(level=options.value(log_level).upper(), format="%(asctime)s mm %(levelname)s %(message)s")
    run(MMOptions(run_dir=run_dir, kernel=kernel, bind=bind or rundir.default_bind(run_dir, "mm"), config=cfg, fsync=fsync))


def audit(
    run_dir: str = typer.Option(options.DEFAULT_RUN_DIR, "--run-dir", help="Run directory of a running system.",
                                callback=options.run_dir_callback()),
    endpoint: Optional[str] = typer.Option(None, "--mm", help="The mm's endpoint (default: RUN/mm.endpoint).",
                                           callback=options.endpoint_callback("--mm")),
    json_out: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, max=3600.0, help="Seconds to wait for the mm's report."),
) -> None:
    """Compare the mm's view with the kernel's frame by frame and check every client's charges (as the
    operator); exit 1 on any divergence or charge problem, 2 if no report."""
    import json

    from protocol import rundir

    if endpoint is None and not rundir.held(run_dir, "mm"):  # known at once from the lock, no timeout
        typer.echo(f"audit failed: is the mm running? Nothing holds {rundir.lock_path(run_dir, 'mm')}, so no mm runs "
                   f"with {run_dir} (start one: mmsim up, or mmsim mm --run-dir {run_dir})", err=True)
        raise typer.Exit(2)
    from mm_service.audit import format_report, run_audit
    from protocol.errors import CallError

    try:
        report = run_audit(run_dir, endpoint, timeout=timeout)
    except FileNotFoundError as exc:
        typer.echo(f"audit failed: {exc}", err=True)
        raise typer.Exit(2) from None
    except CallError as exc:
        hint = " (is the mm running?)" if exc.name == "EIO" else ""
        typer.echo(f"audit failed: {exc}{hint}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report, indent=2) if json_out else format_report(report))
    raise typer.Exit(1 if report["divergences"] or report.get("i13_problems") else 0)
