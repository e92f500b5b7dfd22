"""The run directory's layout: key pairs, admitted keys, published endpoints, ipc sockets, locks, logs
and the run's report.

Everything a run keeps on disk is named here, and only here:

    RUN/keys/              key pairs (below)
    RUN/keys/admitted/     the public keys of the admitted clients (``admit``/``revoke``/``Admission``)
    RUN/kernel.endpoint    the endpoint the kernel bound (``write_endpoint``/``read_endpoint``/``withdraw``)
    RUN/mm.endpoint        the endpoint the mm bound
    RUN/kernel.lock        held by the running kernel (``lock``; ``held`` asks whether it is)
    RUN/mm.lock            held by the running mm
    RUN/mm.db              the mm's journal (``journal_path``)
    RUN/logs/              one log per process started by the launcher (``logs_dir``)
    RUN/report.json        what ``mmsim up`` and ``mmsim chaos`` found, as data (``write_report``)
    /tmp/mmsim-<hash>/     the run's ipc sockets (``ipc_dir``: ipc paths must stay under 107 bytes)

A server that stops takes back what it published (``withdraw``: its endpoint
file, its ipc socket file, the ipc directory once empty) while it still holds
its lock, so nothing another server of the run wrote is ever removed.
``reset`` clears a stopped run for reuse; it never removes a file the layout
does not name.

A process is a CURVE key pair (its identity is the Z85 public key the server's
ZAP handler reports as ``User-Id``). ``init(run_dir)`` writes pairs for the
kernel, the mm and some clients with ``zmq.auth.create_certificates``:

    RUN/keys/kernel.key         public certificate
    RUN/keys/kernel.key_secret  secret certificate (mode 0600)
    RUN/keys/mm.key ...         and operator, client-0, client-1, ...

The ``operator`` key is the human's (``mmsim audit``, ``status``): the kernel
and the mm always admit it and it may read what only the mm may otherwise
read (frame_info, mappings, per-process listings), never change anything.

Admission (who may talk to the servers at all) follows pyzmq's certificate
directory convention: ``RUN/keys/admitted/<name>.key`` is a public
certificate, optionally with a ``metadata`` section naming per-key quotas
(``quota`` user pages, ``kernel_quota`` kernel frames). Both servers' ZAP
handlers accept the mm, the operator and the keys in that directory, and
refuse every other key at the CURVE handshake. ``Admission`` re-reads the
directory when it changes, so a key admitted while the servers run is
accepted without a restart.

Endpoints are published next to them (``RUN/kernel.endpoint``,
``RUN/mm.endpoint``) by the servers (``write_endpoint``/``read_endpoint``). Nothing here is ever committed to git.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
from dataclasses import dataclass
from typing import Any

# zmq is imported where keys are made or read, so that looking at a run directory (locks, endpoints,
# reports, admitted keys) stays cheap for the commands that only do that.

KEYS_DIR = "keys"
ADMITTED_DIR = "admitted"  # under KEYS_DIR
LOGS_DIR = "logs"
REPORT = "report.json"
JOURNAL = "mm.db"
LOCKED = ("kernel", "mm")  # the servers that lock the run directory
SERVERS = ("kernel", "mm", "operator")  # the key pairs every run has
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def keys_dir(run_dir: str) -> str:
    return os.path.join(run_dir, KEYS_DIR)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"bad key name {name!r}: letters, digits, '_', '.', '-' only (at most 64)")


Z85_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_VALUE = {c: i for i, c in enumerate(Z85_CHARS)}


def check_key(key: str) -> str:
    """``key`` if it is a CURVE public key in Z85 (40 characters, 32 bytes), else ValueError."""
    if not isinstance(key, str) or len(key) != 40:
        raise ValueError(f"a Z85 public key has 40 characters, not {len(key) if isinstance(key, str) else key!r}")
    bad = sorted({c for c in key if c not in _Z85_VALUE})
    if bad:
        raise ValueError(f"{key!r} is not a Z85 key: {''.join(bad)!r} is not in the Z85 alphabet")
    for i in range(0, 40, 5):
        v = 0
        for c in key[i:i + 5]:
            v = v * 85 + _Z85_VALUE[c]
        if v >= 1 << 32:
            raise ValueError(f"{key!r} is not a Z85 key: the group {key[i:i + 5]!r} is out of range")
    return key


def generate(run_dir: str, name: str, overwrite: bool = False) -> bytes:
    """Create the key pair ``name`` (unless it exists and ``overwrite`` is false); its public key."""
    _check_name(name)
    d = keys_dir(run_dir)
    os.makedirs(d, mode=0o700, exist_ok=True)
    pub_path = os.path.join(d, f"{name}.key")
    sec_path = os.path.join(d, f"{name}.key_secret")
    if not overwrite and os.path.exists(pub_path) and os.path.exists(sec_path):
        return public_key(run_dir, name)
    import zmq.auth

    pub_tmp, sec_tmp = zmq.auth.create_certificates(d, f".{name}.tmp")
    os.chmod(sec_tmp, 0o600)
    os.replace(sec_tmp, sec_path)  # the secret first: a public key never stands alone
    os.replace(pub_tmp, pub_path)
    return public_key(run_dir, name)


def init(run_dir: str, clients: int = 4, overwrite: bool = False) -> dict[str, str]:
    """Key pairs for the kernel, the mm, the operator and ``clients`` clients (admitted); returns
    name -> public key."""
    if clients < 0:
        raise ValueError("the number of client keys cannot be negative")
    out = {n: generate(run_dir, n, overwrite).decode() for n in SERVERS}
    for i in range(clients):
        name = f"client-{i}"
        out[name] = generate(run_dir, name, overwrite).decode()
        admit(run_dir, name)
    return out


def public_key(run_dir: str, name: str) -> bytes:
    _check_name(name)
    import zmq.auth

    path = os.path.join(keys_dir(run_dir), f"{name}.key")
    try:
        pub, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"no public key {name!r} in {keys_dir(run_dir)} "
                                f"(run `mmsim keys init {run_dir}`): {exc}") from None
    return pub


def operator_key(run_dir: str) -> str | None:
    """The operator's public key (Z85), or None if this run directory has none."""
    try:
        return public_key(run_dir, "operator").decode()
    except FileNotFoundError:
        return None


def load_keypair(run_dir: str, name: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of ``name``."""
    _check_name(name)
    import zmq.auth

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


# ---- admission ---------------------------------------------------------------------

def admitted_dir(run_dir: str) -> str:
    return os.path.join(keys_dir(run_dir), ADMITTED_DIR)


@dataclass(frozen=True)
class Grant:
    """An admitted key and its per-key quota overrides (None: the mm's defaults)."""

    name: str
    key: str
    quota: int | None = None  # user pages
    kernel_quota: int | None = None  # kernel frames


_KEY_LINE = re.compile(r'^\s*public-key\s*=\s*"(.{40})"\s*$', re.M)
_META_LINE = re.compile(r'^\s+([a-z_]+)\s*=\s*"([^"]*)"\s*$')


def _read_grant(path: str, name: str) -> Grant | None:
    """The grant a public certificate describes, or None if it is not one."""
    try:
        with open(path) as f:
            text = f.read(4096)
    except OSError:
        return None
    m = _KEY_LINE.search(text)
    if m is None:
        return None
    meta: dict[str, int] = {}
    section = ""
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            section = line.strip()
        elif section == "metadata" and (mm := _META_LINE.match(line)) and mm.group(2).isdigit():
            meta[mm.group(1)] = int(mm.group(2))
    return Grant(name, m.group(1), meta.get("quota"), meta.get("kernel_quota"))


def admit(run_dir: str, name: str, key: str | bytes | None = None, quota: int | None = None,
          kernel_quota: int | None = None) -> Grant:
    """Admit a client key: ``RUN/keys/admitted/<name>.key`` (the public key of the pair ``name``, or
    ``key`` given as Z85), with optional quota overrides. Replaces an earlier admission of ``name``."""
    _check_name(name)
    if name in SERVERS:
        raise ValueError(f"{name!r} is a server's key pair: it is always admitted, as itself")
    if key is None:
        key = public_key(run_dir, name)
    key = check_key(key.decode() if isinstance(key, bytes) else key)
    for what, v in (("quota", quota), ("kernel_quota", kernel_quota)):
        if v is not None and v < 1:
            raise ValueError(f"{what} must be at least 1, not {v}")
    d = admitted_dir(run_dir)
    os.makedirs(d, mode=0o700, exist_ok=True)
    meta = "".join(f'    {k} = "{v}"\n' for k, v in (("quota", quota), ("kernel_quota", kernel_quota)) if v)
    text = ("#   ****  mmsim: an admitted client key  ****\n#   ZeroMQ CURVE Public Certificate\n\n"
            + (f"metadata\n{meta}" if meta else "") + f'curve\n    public-key = "{key}"\n')
    path = os.path.join(d, f"{name}.key")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic: a server re-reading the directory sees the old file or the new one
    return Grant(name, key, quota, kernel_quota)


def revoke(run_dir: str, name: str) -> bool:
    """Take back an admission; False if ``name`` was not admitted. (Connections already made stay up
    until they close: ZAP runs at the handshake; the client's process ends with its lease.)"""
    _check_name(name)
    try:
        os.remove(os.path.join(admitted_dir(run_dir), f"{name}.key"))
        return True
    except FileNotFoundError:
        return False


def admitted(run_dir: str) -> dict[str, Grant]:
    """Every admitted key: public key (Z85) -> Grant."""
    d = admitted_dir(run_dir)
    try:
        files = sorted(f for f in os.listdir(d) if f.endswith(".key"))
    except FileNotFoundError:
        return {}
    out: dict[str, Grant] = {}
    for f in files:
        g = _read_grant(os.path.join(d, f), f[: -len(".key")])
        if g is not None:
            out[g.key] = g
    return out


# A directory's mtime comes from the kernel's coarse clock: two changes within one of its ticks (a few ms)
# leave the same stamp. A look whose stamp is younger than this was maybe followed by a change with that
# same stamp ("racy", as git calls such index entries), so the next look re-reads the directory anyway.
RACY_NS = 50_000_000


class Admission:
    """The admitted keys of a run directory as a server sees them: always the ``always`` keys (the
    mm, the operator), plus ``RUN/keys/admitted/``, re-read when the directory changes (an unknown
    key's handshake costs one stat of the directory, and a re-read only in the ``RACY_NS`` after a
    change). A cached "no" is never given: it refused keys admitted a moment before, and ZeroMQ never
    retries a refused handshake. Safe to read from the ZAP thread while the server thread refreshes it."""

    def __init__(self, run_dir: str | None, always: tuple[str, ...] = ()) -> None:
        self.run_dir = run_dir
        self.always = frozenset(always)
        self.grants: dict[str, Grant] = {}
        self._seen: tuple[int | None, bool] = (None, True)  # (the stamp last read, whether it was racy)
        self.reloads = 0
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> bool:
        """Re-read the directory if it changed, if the last look was racy, or if ``force``; True if the
        grants changed."""
        if self.run_dir is None:
            return False
        try:
            stamp: int | None = os.stat(admitted_dir(self.run_dir)).st_mtime_ns
        except FileNotFoundError:
            stamp = None
        seen, racy = self._seen
        if not force and not racy and stamp == seen:
            return False
        read_at = time.time_ns()  # (taken before the listing: a change after it is later than this)
        grants = admitted(self.run_dir)
        changed = grants != self.grants
        self.grants = grants  # one assignment: readers see the old dict or the new one
        # (both ways: an mtime from a clock ahead of ours, a shared volume's, is racy for as long, never for good:
        # else every stranger's handshake would read the whole directory again)
        self._seen = (stamp, stamp is not None and abs(read_at - stamp) < RACY_NS)
        self.reloads += 1
        return changed

    def allowed(self, key: str) -> bool:
        if key in self.always or key in self.grants:
            return True
        # an unknown key: look whether the directory changed (one stat; it is re-read only if it did). Never
        # answer from an older look: ZeroMQ does not retry a refused CURVE handshake, so a key admitted a
        # moment ago and refused once would stay locked out for the life of its socket.
        self.refresh()
        return key in self.grants

    def grant(self, key: str) -> Grant | None:
        return self.grants.get(key)

    def callback(self, domain: str, key: bytes | str) -> bool:
        """pyzmq's CURVE credentials-provider hook (``Authenticator.configure_curve_callback``)."""
        return self.allowed(key.decode() if isinstance(key, bytes) else key)


def fresh_keypair() -> tuple[bytes, bytes]:
    """A throw-away key pair (not written anywhere): an anonymous or hostile client."""
    import zmq

    return zmq.curve_keypair()


# ---- endpoints published in the run directory ------------------------------------

def endpoint_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, f"{name}.endpoint")


def write_endpoint(run_dir: str, name: str, endpoint: str) -> None:
    """Publish ``RUN/<name>.endpoint`` atomically (readers never see half a line)."""
    path = endpoint_path(run_dir, name)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(endpoint + "\n")
    os.replace(tmp, path)


def read_endpoint(run_dir: str, name: str) -> str:
    """The endpoint a server published in the run directory (``kernel`` or ``mm``)."""
    path = endpoint_path(run_dir, name)
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: is the {name} running with --run-dir {run_dir}?") from None


def withdraw_endpoint(run_dir: str, name: str, endpoint: str | None = None) -> bool:
    """Remove ``RUN/<name>.endpoint`` if it names ``endpoint`` (any endpoint if None): a stopping
    server takes back what it published, never what a newer server of that name wrote. True if removed."""
    path = endpoint_path(run_dir, name)
    try:
        if endpoint is not None:
            with open(path) as f:
                if f.read().strip() != endpoint:
                    return False
        os.remove(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False


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


def remove_ipc_socket(endpoint: str) -> bool:
    """Unlink the socket file of an ``ipc://`` endpoint (ZeroMQ leaves it behind when the socket
    closes). Only a socket file is removed; True if one was."""
    if not endpoint.startswith("ipc://"):
        return False
    path = endpoint[len("ipc://"):]
    if not path or path.startswith("@"):  # abstract namespace: no file
        return False
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
        os.remove(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False


def remove_ipc_dir(run_dir: str, only_if_empty: bool = False) -> bool:
    """Remove the run's ipc socket directory (once its servers have stopped); with ``only_if_empty``
    only when no socket is left in it. True if it is gone."""
    d = ipc_dir(run_dir, create=False)
    if only_if_empty:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError:  # not empty: another server of the run still has its socket there
            return False
        return True
    shutil.rmtree(d, ignore_errors=True)
    return not os.path.exists(d)


def withdraw(run_dir: str, name: str, endpoint: str) -> None:
    """What a stopping server calls, while it still holds its lock and before it closes its socket:
    its endpoint file (if it still names ``endpoint``), its ipc socket file, and the run's ipc
    directory once nothing else is in it. Nothing of another server's is touched; never raises
    for what is already gone."""
    withdraw_endpoint(run_dir, name, endpoint)
    if endpoint.startswith("ipc://") and os.path.dirname(endpoint[len("ipc://"):]) == ipc_dir(run_dir, create=False):
        remove_ipc_socket(endpoint)
        remove_ipc_dir(run_dir, only_if_empty=True)
    else:
        remove_ipc_socket(endpoint)


def lock_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, f"{name}.lock")


def lock(run_dir: str, name: str) -> int:
    """Hold ``RUN/<name>.lock`` for the life of this process: one kernel and one mm per run directory.
    The OS drops the lock when the process dies, even by ``kill -9``. Returns the fd; raises
    ``SystemExit`` naming the holder's pid when another live process holds it."""
    import fcntl

    path = lock_path(run_dir, name)
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

    try:
        fd = os.open(lock_path(run_dir, name), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def holder(run_dir: str, name: str) -> int | None:
    """The pid of the process holding ``RUN/<name>.lock``, or None if nobody holds it."""
    if not held(run_dir, name):
        return None
    try:
        with open(lock_path(run_dir, name)) as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# ---- logs, the report, reuse -------------------------------------------------------

def logs_dir(run_dir: str) -> str:
    return os.path.join(run_dir, LOGS_DIR)


def journal_path(run_dir: str) -> str:
    return os.path.join(run_dir, JOURNAL)


def report_path(run_dir: str) -> str:
    return os.path.join(run_dir, REPORT)


def write_report(run_dir: str, report: dict[str, Any]) -> str:
    """Write ``RUN/report.json`` atomically (what ``mmsim up``/``chaos`` printed, as data); its path."""
    path = report_path(run_dir)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_report(run_dir: str) -> dict[str, Any]:
    with open(report_path(run_dir)) as f:
        return json.load(f)


def is_run_dir(path: str) -> bool:
    """Whether ``path`` looks like a run directory (it has ``keys/``)."""
    return os.path.isdir(keys_dir(path))


def running(run_dir: str) -> list[str]:
    """The servers of the run that are running now (their locks are held)."""
    return [name for name in LOCKED if held(run_dir, name)]


def named_by_layout(entry: str) -> bool:
    """Whether a top-level name in a run directory is one the layout names (or a temporary of one)."""
    if entry in (KEYS_DIR, LOGS_DIR, REPORT, JOURNAL) or entry.startswith(JOURNAL + "-"):
        return True
    if entry.endswith((".endpoint", ".lock")) or re.fullmatch(r".+\.(endpoint|json)\.\d+\.tmp", entry):
        return True
    return False


def reset(run_dir: str) -> list[str]:
    """Clear a stopped run for reuse: everything the layout names (keys, admitted keys, endpoints,
    locks, the journal, logs, the report, the ipc sockets), nothing else. Returns what is left
    (files the layout does not name, untouched). RuntimeError if a server of the run is running."""
    live = running(run_dir)
    if live:
        pids = ", ".join(f"{n} pid {holder(run_dir, n) or '?'}" for n in live)
        raise RuntimeError(f"{run_dir} is in use by a running system ({pids})")
    left = []
    for entry in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, entry)
        if not named_by_layout(entry):
            left.append(entry)
        elif os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    remove_ipc_dir(run_dir)
    return left
