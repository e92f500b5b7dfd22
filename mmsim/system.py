"""The process supervisor: kernel, mm and clients as separate OS processes of one run.

``System(run_dir)`` makes the run directory and its keys (kernel, mm,
operator, and admitted client key pairs), then starts each part with
``python -m mmsim.cli ...`` (no reliance on PATH), its output in
``RUN/logs/<name>.log``. It admits every client it starts (``start_client``;
``retire`` revokes one) and looks at the servers as the operator. Starting
waits for readiness (the endpoint file published and a real reply over
CURVE), never for a fixed time, and fails with the log's tail if the process
dies first. Children get SIGKILL if the supervisor dies (Linux
``PR_SET_PDEATHSIG``), so no test or launcher leaves orphans; ``stop`` also
removes what stopped servers left behind (endpoint files, ipc sockets). Used
by ``mmsim up``, ``mmsim chaos``, the benchmarks and the multi-process tests.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from protocol import rundir
from protocol.connection import Connection
from protocol.errors import CallError


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()  # own process group: a Ctrl-C at the terminal goes to the supervisor only


class StartError(RuntimeError):
    """A part of the system did not come up; the message carries its log's tail."""


@dataclass
class Part:
    name: str
    role: str  # kernel, mm, client, attack, other
    argv: list[str]
    log_path: str
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


class System:
    def __init__(
        self,
        run_dir: str,
        arch: str = "i686",
        memory: str = "256MiB",
        lease: float = 5.0,
        kernel_pool: int | None = None,
        transport: str = "ipc",
        mm_args: Sequence[str] = (),
        kernel_args: Sequence[str] = (),
        clients: int = 4,
        fresh: bool = False,
    ) -> None:
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', not {transport!r}")
        self.run_dir = os.path.abspath(run_dir)
        if fresh and os.path.isdir(self.run_dir):
            shutil.rmtree(self.run_dir)
        os.makedirs(rundir.logs_dir(self.run_dir), exist_ok=True)
        rundir.init(self.run_dir, clients=clients)
        # "observer": an admitted client identity that never has a process of its own (a bystander for tests:
        # admitted, yet owning nothing). The system itself looks at the servers as the operator.
        rundir.generate(self.run_dir, "observer")
        rundir.admit(self.run_dir, "observer")
        self.arch, self.memory, self.lease = arch, memory, lease
        self.kernel_pool = kernel_pool
        self.transport = transport
        self.mm_args, self.kernel_args = list(mm_args), list(kernel_args)
        self.parts: dict[str, Part] = {}
        self.restarts: dict[str, int] = {}

    # ---- processes ----------------------------------------------------------------

    def spawn(self, name: str, role: str, args: Sequence[str], env: dict[str, str] | None = None) -> Part:
        """Start ``python -m mmsim.cli ARGS`` as part ``name`` (replacing a dead part of that name)."""
        old = self.parts.get(name)
        if old is not None and old.alive():
            raise ValueError(f"part {name!r} is already running (pid {old.pid})")
        argv = [sys.executable, "-m", "mmsim.cli", *args]
        log_path = os.path.join(rundir.logs_dir(self.run_dir), f"{name}.log")
        log = open(log_path, "ab", buffering=0)
        log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(args)}\n".encode())
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=full_env, preexec_fn=_die_with_parent, close_fds=True)
        log.close()
        part = Part(name, role, argv, log_path, proc)
        if old is not None:
            self.restarts[name] = self.restarts.get(name, 0) + 1
        self.parts[name] = part
        return part

    def _bind(self, name: str) -> str:
        if self.transport == "tcp":
            return "tcp://127.0.0.1:*"
        return rundir.default_bind(self.run_dir, name)

    def _forget_endpoint(self, name: str) -> None:
        rundir.withdraw_endpoint(self.run_dir, name)

    def _wait_ready(self, part: Part, server: str, timeout: float) -> str:
        """Wait until ``server`` published its endpoint and answers a ping; its endpoint."""
        deadline = time.monotonic() + timeout
        pub, sec = rundir.load_keypair(self.run_dir, "operator")
        server_key = rundir.public_key(self.run_dir, server)
        endpoint = None
        while time.monotonic() < deadline:
            if not part.alive():
                raise StartError(f"{part.name} exited with status {part.proc.returncode} while starting:\n"
                                 f"{part.log_tail()}")
            if endpoint is None:
                try:
                    endpoint = rundir.read_endpoint(self.run_dir, server)
                except FileNotFoundError:
                    time.sleep(0.02)
                    continue
            with Connection(endpoint, server_key, pub, sec, timeout=0.5, retries=0) as conn:
                try:
                    conn.call("ping")
                    return endpoint
                except CallError:
                    pass
        raise StartError(f"{part.name} did not become ready within {timeout:g}s:\n{part.log_tail()}")

    def start_kernel(self, timeout: float = 30.0) -> Part:
        self._forget_endpoint("kernel")
        args = ["kernel", "--run-dir", self.run_dir, "--arch", self.arch, "--memory", self.memory,
                "--lease", str(self.lease), "--bind", self._bind("kernel"), *self.kernel_args]
        if self.kernel_pool is not None:
            args += ["--kernel-pool", str(self.kernel_pool)]
        part = self.spawn("kernel", "kernel", args)
        self._wait_ready(part, "kernel", timeout)
        return part

    def start_mm(self, timeout: float = 30.0) -> Part:
        self._forget_endpoint("mm")
        args = ["mm", "--run-dir", self.run_dir, "--kernel", rundir.read_endpoint(self.run_dir, "kernel"),
                "--bind", self._bind("mm"), *self.mm_args]
        part = self.spawn("mm", "mm", args)
        self._wait_ready(part, "mm", timeout)
        return part

    def start(self) -> "System":
        """Kernel, then mm, each waited for."""
        self.start_kernel()
        self.start_mm()
        return self

    def admit(self, name: str, quota: int | None = None, kernel_quota: int | None = None) -> str:
        """Make key pair ``name`` if missing and admit it; its public key."""
        rundir.generate(self.run_dir, name)
        return rundir.admit(self.run_dir, name, quota=quota, kernel_quota=kernel_quota).key

    def retire(self, name: str) -> None:
        """Revoke a client's admission (and its sharer peer's): a client that is gone for good."""
        for n in (name, f"{name}-peer"):
            rundir.revoke(self.run_dir, n)

    def start_client(self, name: str, workload: str, seed: int = 1, duration: float = 10.0,
                     extra: Sequence[str] = ()) -> Part:
        """A workload client process (``mmsim client run``) with key pair ``name``, admitted first (with
        its ``NAME-peer`` for the sharer workload, which shares with that identity)."""
        self.admit(name)
        if workload == "sharer":
            self.admit(f"{name}-peer")
        return self.spawn(name, "client", ["client", "run", "--run-dir", self.run_dir, "--name", name,
                                           "--workload", workload, "--seed", str(seed),
                                           "--duration", str(duration), *extra])

    def restart_mm(self, timeout: float = 30.0) -> Part:
        self.kill("mm", signal.SIGKILL)
        return self.start_mm(timeout)

    def send_signal(self, name: str, sig: int) -> None:
        part = self.parts[name]
        if part.alive():
            os.kill(part.pid, sig)

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Send ``sig`` and (for SIGKILL/SIGTERM) wait for the exit; the exit status."""
        part = self.parts.get(name)
        if part is None:
            raise KeyError(f"no part named {name!r}")
        if part.alive():
            os.kill(part.pid, sig)
            if sig == signal.SIGTERM:
                os.kill(part.pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
        if sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                return part.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                part.proc.kill()
                return part.proc.wait(timeout)
        return None

    def wait(self, name: str, timeout: float | None = None) -> int:
        return self.parts[name].proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> dict[str, int | None]:
        """Clients first, then the mm, then the kernel (so no part waits on a peer that is already gone):
        each group gets SIGTERM, then SIGKILL after ``timeout`` seconds. The exit statuses by name."""
        codes: dict[str, int | None] = {}
        rank = {"kernel": 2, "mm": 1}
        for level in (0, 1, 2):
            group = [p for p in self.parts.values() if rank.get(p.role, 0) == level]
            for p in group:
                if p.alive():
                    try:
                        os.kill(p.pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
                        os.kill(p.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + timeout
            for p in group:
                try:
                    codes[p.name] = p.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.proc.kill()
                    codes[p.name] = p.proc.wait()
        self.cleanup()
        return codes

    def cleanup(self) -> None:
        """Once no server of the run is running: remove what they published and may have left behind
        (endpoint files, the ipc socket directory), e.g. after a kill -9."""
        if rundir.running(self.run_dir):
            return
        for name in ("kernel", "mm"):
            rundir.withdraw_endpoint(self.run_dir, name)
        rundir.remove_ipc_dir(self.run_dir)

    def __enter__(self) -> "System":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- looking at it ----------------------------------------------------------------

    def connection(self, server: str, identity: str = "operator", timeout: float = 2.0, retries: int = 1) -> Connection:
        """A Connection to ``kernel`` or ``mm`` with key pair ``identity`` (close it after use)."""
        pub, sec = rundir.load_keypair(self.run_dir, identity)
        return Connection(rundir.read_endpoint(self.run_dir, server), rundir.public_key(self.run_dir, server),
                          pub, sec, timeout=timeout, retries=retries)

    def kernel_stats(self) -> dict[str, Any]:
        with self.connection("kernel") as conn:
            return conn.call("stats")

    def audit(self, timeout: float = 30.0) -> dict[str, Any]:
        from mm_service.audit import run_audit

        return run_audit(self.run_dir, timeout=timeout)

    def wait_quiet(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the kernel has no client processes left (leases ran out); the last audit."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.kernel_stats()
            if st["processes"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(min(0.2, self.lease / 4))
        return self.audit()
