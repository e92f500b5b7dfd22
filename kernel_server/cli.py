"""The ``mmsim kernel`` command."""

from __future__ import annotations

import logging
from typing import Optional

import typer

from mmsim import options
from mmsim.options import Arch, LogLevel

KERNEL_HELP = "Start the kernel: the authoritative frame table and the system calls, on one CURVE ROUTER socket."


def kernel(
    arch: Arch = typer.Option(Arch.i686, "--arch", help="Architecture profile."),
    memory: str = typer.Option("256MiB", "--memory", metavar="SIZE", help="RAM size, e.g. 256MiB, 4GiB, 64GiB, 1G "
                               "(= 10^9 bytes; rounded down to whole pages), PC-like boot map.",
                               callback=options.size_callback("--memory", memory=True)),
    bind: Optional[str] = typer.Option(None, "--bind", help="ipc://PATH or tcp://HOST:PORT "
                                       "(default: an ipc socket under /tmp for this run directory).",
                                       callback=options.endpoint_callback("--bind")),
    run_dir: str = typer.Option(options.DEFAULT_RUN_DIR, "--run-dir", help="Run directory: keys/ (created if "
                                "missing) and kernel.endpoint are kept here.", callback=options.dir_callback()),
    lease: float = typer.Option(5.0, "--lease", min=0.1, max=86400.0, help="Seconds of silence after which a "
                                "client's process is destroyed (I11)."),
    kernel_pool: Optional[int] = typer.Option(None, "--kernel-pool", min=0, help="Frames in the initial kernel "
                                              "free pool (default: min(256, RAM/16))."),
    mm_key: Optional[str] = typer.Option(None, "--mm-key", help="The memory manager's Z85 public key "
                                         "(default: RUN/keys/mm.key)."),
    boot_map: Optional[str] = typer.Option(None, "--boot-map", metavar="FILE", help="Boot from this map instead: "
                                           'JSON {"arch": NAME, "regions": [[kind, first frame, frames], ...]} '
                                           "(the form test vectors carry); its arch replaces --arch, and "
                                           "--memory and --kernel-pool are not used."),
    log_level: LogLevel = typer.Option(LogLevel.INFO, "--log-level", case_sensitive=False,
                                       help="DEBUG logs every refused call."),
) -> None:
    """Start the kernel process."""
    from kernel_server.arch import PROFILES
    from kernel_server.bootmap import from_json, pc_map
    from kernel_server.server import KernelOptions, run
    from protocol import rundir

    arch = options.value(arch)
    size = options.parse_memory(memory)
    if mm_key is not None:
        try:
            rundir.check_key(mm_key)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--mm-key") from None
    bm = None
    if boot_map is not None:
        import json

        try:
            with open(boot_map) as f:
                arch, bm = from_json(json.load(f), PROFILES)
        except (OSError, ValueError) as exc:  # (json.JSONDecodeError is a ValueError)
            raise typer.BadParameter(f"{boot_map}: {exc}", param_hint="--boot-map") from None
    try:  # a boot map that cannot be built is a usage error: say so before touching the run directory
        if bm is None:
            pc_map(PROFILES[arch], size, kernel_pool)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--memory/--kernel-pool") from None
    logging.basicConfig(level=options.value(log_level).upper(), format="%(asctime)s kernel %(levelname)s %(message)s")
    options.make_dir(run_dir)
    if mm_key is None:
        rundir.init(run_dir, clients=0)  # the default set-up makes its own keys; existing ones are kept
    else:
        rundir.generate(run_dir, "kernel")
    opts = KernelOptions(run_dir=run_dir, bind=bind or rundir.default_bind(run_dir, "kernel"), arch=arch, memory=size,
                         lease_seconds=lease, kernel_pool_frames=kernel_pool, mm_key=mm_key, bootmap=bm)
    try:
        run(opts)
    except ValueError as exc:  # a boot map that cannot be built
        typer.echo(f"kernel: {exc}", err=True)
        raise typer.Exit(2) from None
