"""The run directory's layout: key pairs, published endpoints, ipc sockets and locks.

Everything a run keeps on disk is named here, and only here:

    RUN/keys/              key pairs (below)
    RUN/kernel.endpoint    the endpoint the kernel bound (``write_endpoint``/``read_endpoint``)
    RUN/mm.endpoint        the endpoint the mm bound
    RUN/kernel.lock        held by the running kernel (``lock``)
    RUN/mm.lock            held by the running mm; the mm's journal is RUN/mm.db
    /tmp/mmsim-<hash>/     the run's ipc sockets (``ipc_dir``: ipc paths must stay under 107 bytes)

A process is a CURVE key pair (its identity is the Z85 public key the server's
ZAP handler reports as ``User-Id``). ``init(run_dir)`` writes pairs for the
kernel, the mm and some clients with ``zmq.auth.create_certificates``:

    RUN/keys/kernel.key         public certificate
    RUN/keys/kernel.key_secret  secret certificate (mode 0600)
    RUN/keys/mm.key ...         and client-0, client-1, ...

Endpoints are published next to them (``RUN/kernel.endpoint``,
``RUN/mm.endpoint``) by the servers (``write_endpoint``/``read_endpoint``). Nothing here is ever committed to git.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket

import zmq
import zmq.auth

KEYS_DIR = "keys"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def keys_dir(run_dir: str) -> str:
    return os.path.join(run_dir, KEYS_DIR)


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ValueError(f"bad key name {name!r}: letters, digits, '_', '.', '-' only (at most 64)")


def generate(run_dir: str, name: str, overwrite: bool = False) -> bytes:
    """Create the key pair ``name`` (unless it exists and ``overwrite`` is false); its public key."""
    _check_name(name)
    d = keys_dir(run_dir)
    os.makedirs(d, mode=0o700, exist_ok=True)
    pub_path = os.path.join(d, f"{name}.key")
    sec_path = os.path.join(d, f"{name}.key_secret")
    if not overwrite and os.path.exists(pub_path) and os.path.exists(sec_path):
        return public_key(run_dir, name)
    pub_tmp, sec_tmp = zmq.auth.create_certificates(d, f".{name}.tmp")
    os.chmod(sec_tmp, 0o600)
    os.replace(sec_tmp, sec_path)  # the secret first: a public key never stands alone
    os.replace(pub_tmp, pub_path)
    return public_key(run_dir, name)


def init(run_dir: str, clients: int = 4, overwrite: bool = False) -> dict[str, str]:
    """Key pairs for the kernel, the mm and ``clients`` clients; returns name -> public key."""
    if clients < 0:
        raise ValueError("the number of client keys cannot be negative")
    names = ["kernel", "mm"] + [f"client-{i}" for i in range(clients)]
    return {n: generate(run_dir, n, overwrite).decode() for n in names}


def public_key(run_dir: str, name: str) -> bytes:
    _check_name(name)
    path = os.path.join(keys_dir(run_dir), f"{name}.key")
    try:
        pub, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"no public key {name!r} in {keys_dir(run_dir)} "
                                f"(run `mmsim keys init {run_dir}`): {exc}") from None
    return pub


def load_keypair(run_dir: str, name: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of ``name``."""
    _check_name(name)
    path = os.path.join(keys_dir(run_dir), f"{name}.key_secret")
    try:
        pub, sec = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"no key pair {name!r} in {keys_dir(run_dir)} "
                                f"(run `mmsim keys init {run_dir}`): {exc}") from None
    if sec is None:
        raise FileNotFoundError(f"{path} holds no secret key")
    return pub, sec


def names(run_dir: str) -> list[str]:
    d = keys_dir(run_dir)
    if not os.path.isdir(d):
        return []
    return sorted(f[: -len(".key_secret")] for f in os.listdir(d) if f.endswith(".key_secret"))


def fresh_keypair() -> tuple[bytes, bytes]:
    """A throw-away key pair (not written anywhere): an anonymous or hostile client."""
    return zmq.curve_keypair()


# ---- endpoints published in the run directory ------------------------------------

def write_endpoint(run_dir: str, name: str, endpoint: str) -> None:
    """Publish ``RUN/<name>.endpoint`` atomically (readers never see half a line)."""
    path = os.path.join(run_dir, f"{name}.endpoint")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(endpoint + "\n")
    os.replace(tmp, path)


def read_endpoint(run_dir: str, name: str) -> str:
    """The endpoint a server published in the run directory (``kernel`` or ``mm``)."""
    path = os.path.join(run_dir, f"{name}.endpoint")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: is the {name} running with --run-dir {run_dir}?") from None


def connectable(endpoint: str) -> str:
    """What a local peer connects to for a bound endpoint (``tcp://0.0.0.0:5555`` -> 127.0.0.1)."""
    for wild in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if endpoint.startswith(wild):
            return "tcp://127.0.0.1:" + endpoint[len(wild):]
    return endpoint


def ipc_in_use(endpoint: str) -> bool:
    """True if ``endpoint`` is an ``ipc://`` path some live process listens on.

    ZeroMQ's ipc bind silently unlinks an existing socket file and takes the
    path over, so a second kernel or mm started on the same run directory
    would steal the address from the running one. Servers ask this first.
    """
    if not endpoint.startswith("ipc://"):
        return False
    path = endpoint[len("ipc://"):]
    if not path or path.startswith("@") or not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:  # refused (a stale file) or not a socket
        return False
    finally:
        s.close()


# ---- ipc sockets and locks ---------------------------------------------------------

def ipc_dir(run_dir: str, create: bool = True) -> str:
    """A short per-run directory under /tmp for ipc sockets (ipc paths must stay under 107 bytes)."""
    tag = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:10]
    d = f"/tmp/mmsim-{tag}"
    if create:
        os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def default_bind(run_dir: str, name: str) -> str:
    """The ipc endpoint server ``name`` (kernel, mm, floor) binds by default for ``run_dir``."""
    return f"ipc://{ipc_dir(run_dir)}/{name}.sock"


def remove_ipc_dir(run_dir: str) -> None:
    """Remove the run's ipc socket directory (once its servers have stopped)."""
    import shutil

    shutil.rmtree(ipc_dir(run_dir, create=False), ignore_errors=True)


def lock(run_dir: str, name: str) -> int:
    """Hold ``RUN/<name>.lock`` for the life of this process: one kernel and one mm per run directory.
    The OS drops the lock when the process dies, even by ``kill -9``. Returns the fd; raises
    ``SystemExit`` naming the holder's pid when another live process holds it."""
    import fcntl

    path = os.path.join(run_dir, f"{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SystemExit(f"{name}: another {name} (pid {other}) is running with the run directory {run_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def held(run_dir: str, name: str) -> bool:
    """Whether a live process holds ``RUN/<name>.lock`` (is the kernel / the mm of this run running?)."""
    import fcntl

    path = os.path.join(run_dir, f"{name}.lock")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
