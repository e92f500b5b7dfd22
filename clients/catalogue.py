"""The catalogue of lies: every lie told to the kernel or the mm, once, as data (issue 9).

Pure data and pure builders: no sockets, clocks or randomness. Whoever tells
the lies reads this module: ``clients.attacks`` over real CURVE sockets
(``mmsim client attack``), the simulator in-process, the tests in-process.

A ``Lie`` is one request: its ``kind`` (the group ``mmsim client attack
--kind`` names) and ``label``, the ``server`` it goes to, the ``call``, who
tells it (``Teller``), how it travels (``Via``: an ordinary CURVE request, or
a lie about the transport itself), how its request is built from the current
state (``build``: a pure function of a ``Scene``), the scene fields it needs
(``needs``), and what it must get (``expect``): the exact errno (and the field
or details where they matter) that the documented refusal precedence gives
(the kernel's rules in order: ``kernel_server.calls``; ``rule`` names the
kernel rule that decides it), or no reply at all (refused at the handshake,
or dropped by the transport), or an answer that passes a check.

A ``Scene`` is the small description of the current state a lie is built
from: the machine (frames, user top, large pages, the address map's regions),
the teller (its key, pid, quota, its own read-write and read-only one-page
allocations), another client to lie about (``Other``), the servers' keys, an
admitted key with no process (``stranger``), a key nobody admitted
(``unknown``), and frames of each state where the teller can know them
(``frame_of``; the simulator knows every state, a live client only the
address map). ``Lie.applicable(scene)`` says whether the scene has what the
lie needs; ``Lie.encode(scene, rid)`` gives the request bytes;
``Lie.judge(reply, scene)`` the verdict on the decoded reply (None: no
reply).

``PROCEDURES`` are checks that take more than one request (floods, replays);
``CLASSES`` are the resource attacks run beside an honest client (the victim's
experience is the verdict). ``KINDS`` lists every kind ``mmsim client attack``
knows, in order, with its server, what it expects, and whether ``mmsim
chaos`` may pick it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Union

from protocol import PAGE_SIZE, PROT_EXEC, PROT_READ, PROT_WRITE, wire
from protocol.calls import MAX_FRAME, MAX_PAGES_PER_CALL
from protocol.errors import Errno

RW = PROT_READ | PROT_WRITE
PROBE_VA = 0x9000_0000  # where a teller tries its maps: it maps nothing there
CLIENT_RUNS = 16  # runs a client may name in one map (kernel_server.core.MAX_CLIENT_RUNS)
CLIENT_PAGES = 256  # pages a client may map or unmap in one call (kernel_server.core.MAX_CLIENT_PAGES)


class Teller(str, enum.Enum):
    """Who tells a lie."""

    NOBODY = "nobody"  # no CURVE identity, or a key nobody admitted: refused at the handshake
    STRANGER = "stranger"  # an admitted key with no process
    CLIENT = "client"  # a client, about itself (its own process, allocations, address space)
    ABOUT_OTHER = "client about another"  # a client naming another client's pid, frames, objects, memory
    MM_KEY = "mm key"  # whoever holds the memory manager's key (the kernel checks the mm too)


class Via(str, enum.Enum):
    """How the request travels."""

    CURVE = "curve"  # an ordinary request on the teller's own CURVE connection
    NO_CURVE = "no curve"  # the NULL mechanism: no identity at all
    WRONG_SERVER_KEY = "wrong server key"  # CURVE towards a made-up server key (a man in the middle's)
    UNKNOWN_KEY = "unknown key"  # CURVE with a key nobody admitted
    ROUTING_ID = "routing id"  # the teller's key, with the mm's public key as its ZeroMQ routing id
    TWO_FRAMES = "two frames"  # the request sent twice in one two-frame ZeroMQ message
    THREE_FRAMES = "three frames"  # an empty frame, the request, and a stray byte in one message


# ---- what a lie is built from --------------------------------------------------------------------


@dataclass(frozen=True)
class Other:
    """Another client, as the teller would name it in a lie."""

    key: str
    pid: int
    vaddr: int  # one of its allocations
    pages: int
    frames: tuple[tuple[int, int], ...]  # the frames of that allocation, as runs
    tid: int = 0  # one of its threads (0: none)
    eid: int = 0  # one of its endpoints (0: none)


@dataclass(frozen=True)
class Scene:
    frames: int  # frames in the kernel's frame table
    user_top: int
    large_frames: int  # frames in the smallest large page (0: none)
    regions: tuple[tuple[str, int, int], ...]  # the address map: (kind, first frame, count)
    me: str  # the teller's key
    pid: int | None = None  # its process
    quota: int = 0  # its user quota at the mm (pages)
    own_rw: int | None = None  # the vaddr of its own one-page read-write allocation (made by the mm)
    own_ro: int | None = None  # ... and of its one-page read-only one
    offer_to_other: int | None = None  # an open offer it made to ``other``
    other: Other | None = None
    mm_key: str = ""
    operator_key: str = ""
    stranger: str = ""  # an admitted key with no process
    unknown: str = ""  # a key nobody admitted
    target_pid: int | None = None  # MM_KEY lies: a process with room for a page table in its kernel quota
    frame_of: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    # ^ frames by state, where known: user_free, user_mapped, kernel_free, kernel_used, kernel_shared

    def first(self, kind: str) -> int | None:
        """The first frame of the address map's first region of ``kind``."""
        return next((first for k, first, _ in self.regions if k == kind), None)

    @property
    def shared(self) -> int | None:
        """A kernel-shared frame (boot image, RAM disk, firmware tables)."""
        for kind in ("kernel_image", "ramdisk", "firmware"):
            if (f := self.first(kind)) is not None:
                return f
        return self.frame_of.get("kernel_shared")

    @property
    def user_free(self) -> int | None:
        """A user frame nobody maps: the one the scene names, else the last frame of the last user region
        (the mm hands out low frames first)."""
        if "user_free" in self.frame_of:
            return self.frame_of["user_free"]
        users = [(first, count) for k, first, count in self.regions if k == "user"]
        return users[-1][0] + users[-1][1] - 1 if users else None

    @property
    def other_tid(self) -> int | None:
        """One of the other client's threads (None: no other client, or it has none)."""
        return self.other.tid or None if self.other is not None else None

    @property
    def other_eid(self) -> int | None:
        """One of the other client's endpoints (None: no other client, or it has none)."""
        return self.other.eid or None if self.other is not None else None

    @property
    def user_mapped(self) -> int | None:
        """A user frame some process maps (where the teller can know one)."""
        return self.frame_of.get("user_mapped")

    @property
    def kernel_used(self) -> int | None:
        """A kernel frame in use (where the teller can know one)."""
        return self.frame_of.get("kernel_used")

    @property
    def kernel_frame(self) -> int | None:
        """A kernel-owned frame that is not kernel-shared (free or in use)."""
        for name in ("kernel_used", "kernel_free"):
            if name in self.frame_of:
                return self.frame_of[name]
        return self.first("kernel_pool")


# A request: the call's arguments; or a whole envelope (``RID`` stands for the request id); or raw bytes.
RID = object()


@dataclass(frozen=True)
class Envelope:
    message: Any  # encoded as is, with every RID replaced by the request id


@dataclass(frozen=True)
class Raw:
    data: bytes


Payload = Union[dict, Envelope, Raw]


@dataclass(frozen=True)
class Expect:
    """What a lie must get: a refusal (``errno``, the ``field`` it names or a part of it, ``details`` keys
    its error carries, ``equal`` details with values taken from the scene), no reply (``errno`` None and
    no ``check``), or an answer that passes ``check`` (result, scene) -> None or what is wrong."""

    errno: Errno | None
    field: str | None = None
    details: tuple[str, ...] = ()
    equal: tuple[tuple[str, str], ...] = ()  # (detail, scene attribute) pairs that must be equal
    check: Callable[[dict, Scene], str | None] | None = None
    text: str = ""  # for an answer: what it must be, in words

    def describe(self) -> str:
        if self.check is not None:
            return self.text or "answered"
        if self.errno is None:
            return "no reply"
        return f"{self.errno.name}(field={self.field})" if self.field else self.errno.name


NO_REPLY = Expect(None)


def refused(errno: Errno, field: str | None = None, details: Iterable[str] = (),
            equal: Iterable[tuple[str, str]] = ()) -> Expect:
    return Expect(errno, field, tuple(details), tuple(equal))


def answered(check: Callable[[dict, Scene], str | None], text: str) -> Expect:
    return Expect(None, check=check, text=text)


# ---- verdicts (pure) ---------------------------------------------------------------------------------


def describe(reply: dict[str, Any] | None) -> str:
    """A reply in a few words: ``EPERM``, ``EINVAL(field=tid)``, ``ok``, ``no reply``."""
    if reply is None:
        return "no reply"
    if reply.get("malformed"):
        return "malformed reply"
    if reply.get("ok") is True:
        return "ok"
    err = reply.get("error")
    if not isinstance(err, dict):
        return "error without details"
    code = str(err.get("code"))
    return f"{code}(field={err['field']})" if "field" in err else code


def verdict_error(reply: dict[str, Any] | None, codes: Iterable[Errno], field: str | None = None) -> tuple[bool, str]:
    """Is ``reply`` a refusal with one of ``codes`` (naming ``field`` or a part of it, if given)?
    Returns (passed, what the reply was)."""
    got = describe(reply)
    if reply is None or reply.get("ok") is not False or not isinstance(reply.get("error"), dict):
        return False, got
    err = reply["error"]
    names = {c.name: int(c) for c in codes}
    code = err.get("code")
    if code not in names or err.get("errno") != names[code]:
        return False, got
    named = str(err.get("field", ""))
    if field is not None and named != field and not named.startswith(field + "."):
        return False, got  # "frames.0.0" names a part of "frames"
    return True, got


def verdict_no_reply(reply: dict[str, Any] | None) -> tuple[bool, str]:
    """A request that must not be served: no reply at all."""
    return reply is None, describe(reply)


def judge(expect: Expect, reply: dict[str, Any] | None, scene: Scene) -> tuple[bool, str]:
    """(passed, what the reply was) for a lie that must get ``expect``."""
    if expect.check is not None:
        got = describe(reply)
        if reply is None or reply.get("ok") is not True or not isinstance(reply.get("result"), dict):
            return False, got
        wrong = expect.check(reply["result"], scene)
        return (True, got) if wrong is None else (False, f"ok, but {wrong}")
    if expect.errno is None:
        return verdict_no_reply(reply)
    ok, got = verdict_error(reply, (expect.errno,), expect.field)
    if not ok:
        return ok, got
    err = reply["error"]  # type: ignore[index]
    missing = [k for k in expect.details if k not in err]
    if missing:
        return False, f"{got} without {', '.join(missing)}"
    for key, attr in expect.equal:
        want = getattr(scene, attr)
        if err.get(key) != want:
            return False, f"{got} with {key}={err.get(key)} (expected {want})"
    return True, got


# ---- a lie ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lie:
    kind: str  # the group (mmsim client attack --kind)
    label: str  # this lie, in a few words
    server: str  # "kernel" or "mm"
    call: str  # the call it makes ("?" for bytes that are not a request)
    teller: Teller
    build: Callable[[Scene], Payload]
    expect: Expect
    needs: tuple[str, ...] = ()  # Scene attributes that must not be None/0/empty
    via: Via = Via.CURVE
    rule: str = ""  # the kernel rule (kernel_server.calls) that decides it, or the mm's reason

    @property
    def name(self) -> str:
        return f"{self.kind}: {self.label}"

    def applicable(self, scene: Scene) -> bool:
        return all(_present(getattr(scene, n)) for n in self.needs)

    def payload(self, scene: Scene) -> Payload:
        return self.build(scene)

    def encode(self, scene: Scene, rid: int) -> bytes:
        """The request's bytes, with request id ``rid``."""
        p = self.build(scene)
        if isinstance(p, Raw):
            return p.data
        if isinstance(p, Envelope):
            return wire.encode(_with_id(p.message, rid))
        return wire.request(rid, self.call, p)

    def judge(self, reply: dict[str, Any] | None, scene: Scene) -> tuple[bool, str]:
        return judge(self.expect, reply, scene)


def _present(v: Any) -> bool:
    if v is None or v == 0:
        return False
    return len(v) > 0 if hasattr(v, "__len__") else True


def _with_id(obj: Any, rid: int) -> Any:
    if obj is RID:
        return rid
    if isinstance(obj, dict):
        return {k: _with_id(v, rid) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_with_id(v, rid) for v in obj]
    return obj


# ---- the lies --------------------------------------------------------------------------------------

LIES: list[Lie] = []


def lie(kind: str, label: str, server: str, call: str, teller: Teller, build: Callable[[Scene], Payload],
        expect: Expect, needs: Iterable[str] = (), via: Via = Via.CURVE, rule: str = "") -> None:
    LIES.append(Lie(kind, label, server, call, teller, build, expect, tuple(needs), via, rule))


K, M = "kernel", "mm"
C, S, O, NB, MK = Teller.CLIENT, Teller.STRANGER, Teller.ABOUT_OTHER, Teller.NOBODY, Teller.MM_KEY
E = Errno


def _runs(o: Other) -> list[list[int]]:
    return [list(r) for r in o.frames]


def _is_me(result: dict, s: Scene) -> str | None:
    if result.get("identity") != s.me or result.get("is_mm") is not False:
        return f"identity {str(result.get('identity'))[:8]}.. is_mm={result.get('is_mm')}"
    return None


# -- identity: lies about who is calling --------------------------------------------------------------

for _srv in (K, M):
    _p = "" if _srv == K else "mm-"
    lie(f"{_p}anonymous", "ping without CURVE", _srv, "ping", NB, lambda s: {}, NO_REPLY, via=Via.NO_CURVE,
        rule="admission")
    lie(f"{_p}wrong-server-key", "ping to a made-up server key", _srv, "ping", NB, lambda s: {}, NO_REPLY,
        via=Via.WRONG_SERVER_KEY, rule="admission")
    lie(f"{_p}unknown-key", "ping with a key nobody admitted", _srv, "ping", NB, lambda s: {}, NO_REPLY,
        via=Via.UNKNOWN_KEY, rule="admission")
lie("forged-routing-id", "hello", K, "hello", C, lambda s: {}, answered(_is_me, "the teller's own identity"),
    via=Via.ROUTING_ID)
lie("forged-routing-id", "donate", K, "donate", C, lambda s: {"frames": [[s.user_free, 1]]}, refused(E.EPERM),
    needs=("user_free",), via=Via.ROUTING_ID, rule="caller")
lie("forged-routing-id", "reclaim", K, "reclaim", C, lambda s: {"count": 1}, refused(E.EPERM), via=Via.ROUTING_ID,
    rule="caller")
lie("forged-routing-id", "mm audit", M, "audit", C, lambda s: {}, refused(E.EPERM), via=Via.ROUTING_ID,
    rule="operator only")

# -- privilege: the mm's and the operator's calls ------------------------------------------------------

for _t, _who in ((C, ""), (S, "stranger-")):
    lie(f"{_who}donate-unprivileged", "a free user frame", K, "donate", _t,
        lambda s: {"frames": [[s.user_free, 1]]}, refused(E.EPERM), ("user_free",), rule="caller")
    lie(f"{_who}reclaim-unprivileged", "by count", K, "reclaim", _t, lambda s: {"count": 16}, refused(E.EPERM),
        rule="caller")
    lie(f"{_who}proc-create-unprivileged", "for a made-up key", K, "proc_create", _t,
        lambda s: {"key": s.unknown, "kernel_quota": 1 << 20}, refused(E.EPERM), ("unknown",), rule="caller")
lie("donate-unprivileged", "another client's frames", K, "donate", O, lambda s: {"frames": _runs(s.other)},
    refused(E.EPERM), ("other",), rule="caller")
lie("reclaim-unprivileged", "a kernel frame", K, "reclaim", C, lambda s: {"frames": [[s.kernel_frame, 1]]},
    refused(E.EPERM), ("kernel_frame",), rule="caller")
lie("proc-create-unprivileged", "for itself", K, "proc_create", C, lambda s: {"key": s.me, "kernel_quota": 1 << 20},
    refused(E.EPERM), rule="caller")
lie("proc-destroy-unprivileged", "another client's process", K, "proc_destroy", O, lambda s: {"pid": s.other.pid},
    refused(E.EPERM), ("other",), rule="caller")
lie("frame-info-unprivileged", "every frame", K, "frame_info", C,
    lambda s: {"frames": [[0, s.frames]], "max_segments": 1 << 14}, refused(E.EPERM), rule="caller")
lie("events-unprivileged", "process events", K, "events", C, lambda s: {"since": 0, "limit": 1000}, refused(E.EPERM),
    rule="caller")
lie("mappings-unprivileged", "another client's mappings", K, "mappings", O,
    lambda s: {"pid": s.other.pid, "vaddr": 0, "pages": s.user_top // PAGE_SIZE}, refused(E.EPERM), ("other",),
    rule="caller")
lie("stats-listing", "the per-process listing", K, "stats", C, lambda s: {"from_pid": 0, "limit": 1000},
    refused(E.EPERM), rule="listing")
lie("stats-listing", "the per-process listing, as a stranger", K, "stats", S, lambda s: {"from_pid": 1},
    refused(E.EPERM), rule="listing")
lie("mm-audit-unprivileged", "audit", M, "audit", C, lambda s: {}, refused(E.EPERM), rule="operator only")

# -- other processes: a client names what is not its own -------------------------------------------------

lie("foreign-pid-map", "a shared frame into another process", K, "map", O,
    lambda s: {"pid": s.other.pid, "vaddr": PROBE_VA, "frames": [[s.shared, 1]], "prot": PROT_READ},
    refused(E.EPERM), ("other", "pid", "shared"), rule="other_process")
lie("foreign-pid-map", "another client's frames into its process", K, "map", O,
    lambda s: {"pid": s.other.pid, "vaddr": PROBE_VA, "frames": _runs(s.other), "prot": RW},
    refused(E.EPERM), ("other", "pid"), rule="other_process")
lie("foreign-pid-unmap", "another client's memory", K, "unmap", O,
    lambda s: {"pid": s.other.pid, "vaddr": s.other.vaddr, "pages": s.other.pages}, refused(E.EPERM),
    ("other", "pid"), rule="other_process")
lie("foreign-frame-map", "another client's frames read-write", K, "map", O,
    lambda s: {"vaddr": PROBE_VA, "frames": _runs(s.other), "prot": RW}, refused(E.EPERM), ("other", "pid"),
    rule="client_not_shared")
lie("foreign-frame-map", "another client's frames read-only", K, "map", O,
    lambda s: {"vaddr": PROBE_VA, "frames": _runs(s.other), "prot": PROT_READ}, refused(E.EPERM), ("other", "pid"),
    rule="client_not_shared")
lie("foreign-frame-map", "a free user frame", K, "map", C,
    lambda s: {"vaddr": PROBE_VA, "frames": [[s.user_free, 1]], "prot": RW}, refused(E.EPERM), ("pid", "user_free"),
    rule="client_not_shared")
lie("foreign-vaddr-unmap", "another client's address, in its own space", K, "unmap", O,
    lambda s: {"vaddr": s.other.vaddr, "pages": s.other.pages}, refused(E.EINVAL), ("other", "pid"), rule="hole")
lie("foreign-objects", "another client's thread", K, "thread_destroy", O, lambda s: {"tid": s.other_tid},
    refused(E.ESRCH), ("other_tid", "pid"), rule="no_thread")
lie("foreign-objects", "another client's endpoint", K, "endpoint_destroy", O, lambda s: {"eid": s.other_eid},
    refused(E.ESRCH), ("other_eid", "pid"), rule="no_endpoint")
lie("mm-free-foreign", "another client's allocation", M, "free", O,
    lambda s: {"vaddr": s.other.vaddr, "pages": s.other.pages}, refused(E.EINVAL), ("other",),
    rule="no allocation starts there")
lie("mm-share-foreign", "another client's allocation, to itself", M, "share", O,
    lambda s: {"vaddr": s.other.vaddr, "pages": s.other.pages, "peer": s.me, "prot": PROT_READ}, refused(E.EINVAL),
    ("other",), rule="no allocation starts there")
lie("mm-accept-foreign", "an offer that does not exist", M, "accept", C, lambda s: {"offer": 1 << 50},
    refused(E.ESRCH), rule="no open offer for you")
lie("mm-accept-foreign", "its own offer to another client", M, "accept", O, lambda s: {"offer": s.offer_to_other},
    refused(E.ESRCH), ("offer_to_other",), rule="no open offer for you")

# -- unsolicited sharing: nothing appears without its owner's call; no process for a key nobody runs --------

lie("mm-share-unsolicited", "to a key nobody admitted", M, "share", C,
    lambda s: {"vaddr": s.own_rw, "pages": 1, "peer": s.unknown, "prot": PROT_READ},
    refused(E.ESRCH, details=("peer",)),
    ("own_rw", "unknown"), rule="peer not an admitted client with a live process")
lie("mm-share-unsolicited", "to an admitted key with no process", M, "share", C,
    lambda s: {"vaddr": s.own_rw, "pages": 1, "peer": s.stranger, "prot": PROT_READ},
    refused(E.ESRCH, details=("peer",)), ("own_rw", "stranger"), rule="peer not an admitted client with a live process")
lie("mm-share-unsolicited", "to the mm's own key", M, "share", C,
    lambda s: {"vaddr": s.own_rw, "pages": 1, "peer": s.mm_key, "prot": PROT_READ}, refused(E.ESRCH),
    ("own_rw", "mm_key"), rule="peer not an admitted client with a live process")
lie("mm-share-unsolicited", "to itself", M, "share", C,
    lambda s: {"vaddr": s.own_rw, "pages": 1, "peer": s.me, "prot": PROT_READ}, refused(E.EINVAL, "peer"),
    ("own_rw",), rule="a client cannot share with itself")
lie("mm-share-more-rights", "a read-only allocation shared read-write", M, "share", C,
    lambda s: {"vaddr": s.own_ro, "pages": 1, "peer": s.unknown, "prot": RW}, refused(E.EPERM), ("own_ro", "unknown"),
    rule="more access than the allocation has")

# -- the teller's own address space ------------------------------------------------------------------------

lie("map-kernel-frame", "a kernel pool frame", K, "map", C,
    lambda s: {"vaddr": PROBE_VA, "frames": [[s.kernel_frame, 1]], "prot": PROT_READ}, refused(E.EPERM),
    ("pid", "kernel_frame"), rule="client_not_shared")
lie("map-kernel-frame", "a frame-table frame", K, "map", C,
    lambda s: {"vaddr": PROBE_VA, "frames": [[s.first("frame_table"), 1]], "prot": PROT_READ}, refused(E.EPERM),
    ("pid",), rule="client_not_shared")
lie("map-kernel-frame", "a large page over the kernel image (more pages than a client maps)", K, "map", C,
    lambda s: {"vaddr": PROBE_VA, "frames": [[s.first("kernel_image") // s.large_frames * s.large_frames,
                                               s.large_frames]], "prot": PROT_READ, "large": True},
    refused(E.E2BIG), ("pid", "large_frames"), rule="client_size")
for _kind in ("kernel_image", "ramdisk", "firmware"):
    lie("map-boot-image-writable", f"{_kind} read-write", K, "map", C,
        lambda s, k=_kind: {"vaddr": PROBE_VA, "frames": [[s.first(k) if s.first(k) is not None else s.shared, 1]],
                            "prot": RW}, refused(E.EPERM), ("pid", "shared"), rule="shared_read_only")
lie("map-boot-image-writable", "kernel_image read-execute", K, "map", C,
    lambda s: {"vaddr": PROBE_VA, "frames": [[s.shared, 1]], "prot": PROT_READ | PROT_EXEC}, refused(E.EPERM),
    ("pid", "shared"), rule="shared_read_only")
for _prot in (PROT_WRITE | PROT_EXEC, RW | PROT_EXEC):
    lie("map-wx", f"prot {_prot}", K, "map", C,
        lambda s, p=_prot: {"vaddr": PROBE_VA, "frames": [[s.shared, 1]], "prot": p}, refused(E.ENOTSUP),
        ("pid", "shared"), rule="write_exec")
lie("map-unaligned", "map half a page in", K, "map", C,
    lambda s: {"vaddr": PROBE_VA + 0x800, "frames": [[s.shared, 1]], "prot": PROT_READ}, refused(E.EINVAL, "vaddr"),
    ("pid", "shared"), rule="alignment")
lie("map-unaligned", "unmap one byte in", K, "unmap", C, lambda s: {"vaddr": s.own_rw + 1, "pages": 1},
    refused(E.EINVAL, "vaddr"), ("pid", "own_rw"), rule="alignment")
for _label, _va, _n in (("at the user top", lambda s: s.user_top, 1),
                        ("crossing the user top", lambda s: s.user_top - PAGE_SIZE, 2),
                        ("near 2**64", lambda s: (1 << 64) - PAGE_SIZE, 1)):
    lie("map-out-of-range", f"vaddr {_label}", K, "map", C,
        lambda s, v=_va, n=_n: {"vaddr": v(s), "frames": [[s.shared, n]], "prot": PROT_READ},
        refused(E.EINVAL, "vaddr"), ("pid", "shared"), rule="user_space")
lie("map-out-of-range", "vaddr 2**64 - 1", K, "map", C,
    lambda s: {"vaddr": (1 << 64) - 1, "frames": [[s.shared, 1]], "prot": PROT_READ}, refused(E.EINVAL, "vaddr"),
    ("pid", "shared"), rule="alignment")
lie("map-out-of-range", "negative vaddr", K, "map", C,
    lambda s: {"vaddr": -PAGE_SIZE, "frames": [[s.shared, 1]], "prot": PROT_READ}, refused(E.EINVAL, "vaddr"),
    ("pid", "shared"), rule="args")
lie("map-out-of-range", "a frame beyond RAM", K, "map", C,
    lambda s: {"vaddr": PROBE_VA, "frames": [[s.frames, 1]], "prot": PROT_READ}, refused(E.EINVAL, details=("frames",)),
    ("pid",), rule="beyond_memory")
lie("map-out-of-range", "a frame beyond any", K, "map", C,
    lambda s: {"vaddr": PROBE_VA, "frames": [[MAX_FRAME + 1, 1]], "prot": PROT_READ}, refused(E.EINVAL, "frames"),
    ("pid",), rule="args")
lie("map-out-of-range", "unmap at the user top", K, "unmap", C, lambda s: {"vaddr": s.user_top, "pages": 1},
    refused(E.EINVAL, "vaddr"), ("pid",), rule="user_space")
for _label, _runs_ in (("count 0", [[5, 0]]), ("negative first", [[-1, 1]]), ("three numbers", [[5, 1, 1]]),
                       ("overflow", [[MAX_FRAME, 2]]), ("empty", []), ("not a list", 5), ("strings", [["5", "1"]])):
    lie("bad-runs", _label, K, "map", C,
        lambda s, r=_runs_: {"vaddr": PROBE_VA, "frames": r, "prot": PROT_READ}, refused(E.EINVAL, "frames"), ("pid",),
        rule="args")
lie("too-many-runs", f"{CLIENT_RUNS + 1} runs in a client's map", K, "map", C,
    lambda s: {"vaddr": PROBE_VA, "frames": [[s.shared, 1]] * (CLIENT_RUNS + 1), "prot": PROT_READ},
    refused(E.E2BIG), ("pid", "shared"), rule="client_size")
lie("too-many-runs", f"{wire.MAX_RUNS + 1} runs in a donate", K, "donate", C,
    lambda s: {"frames": [[s.shared, 1]] * (wire.MAX_RUNS + 1)}, refused(E.E2BIG), ("shared",), rule="size")
lie("unmap-mm-memory", "its own read-write page", K, "unmap", C, lambda s: {"vaddr": s.own_rw, "pages": 1},
    refused(E.EPERM), ("pid", "own_rw"), rule="made_by_mm")
lie("unmap-mm-memory", "its own read-only page", K, "unmap", C, lambda s: {"vaddr": s.own_ro, "pages": 1},
    refused(E.EPERM), ("pid", "own_ro"), rule="made_by_mm")

# -- a stranger (admitted, no process) ----------------------------------------------------------------------

lie("stranger-no-process", "thread_create", K, "thread_create", S, lambda s: {}, refused(E.ESRCH),
    rule="caller_process")
lie("stranger-no-process", "endpoint_create", K, "endpoint_create", S, lambda s: {}, refused(E.ESRCH),
    rule="caller_process")
lie("stranger-no-process", "map a shared frame", K, "map", S,
    lambda s: {"vaddr": PROBE_VA, "frames": [[s.shared, 1]], "prot": PROT_READ}, refused(E.ESRCH), ("shared",),
    rule="no_process")
lie("stranger-no-process", "free", M, "free", S, lambda s: {"vaddr": 0x4000_0000, "pages": 1}, refused(E.EINVAL),
    rule="no allocation starts there")
lie("stranger-no-process", "share", M, "share", S,
    lambda s: {"vaddr": 0x4000_0000, "pages": 1, "peer": s.unknown, "prot": PROT_READ}, refused(E.EINVAL),
    ("unknown",), rule="no allocation starts there")
lie("stranger-no-process", "accept", M, "accept", S, lambda s: {"offer": 1}, refused(E.ESRCH),
    rule="no open offer for you")

# -- the mm's rules: refused before anything is made -------------------------------------------------------

for _t, _who in ((C, ""), (S, "stranger-")):
    lie(f"{_who}mm-alloc-wx", "W+X", M, "alloc", _t, lambda s: {"pages": 1, "prot": RW | PROT_EXEC},
        refused(E.ENOTSUP, "prot"), rule="W+X")
    lie(f"{_who}mm-quota", "one page more than its quota", M, "alloc", _t,
        lambda s: {"pages": s.quota + 1, "prot": RW}, refused(E.ENOMEM, details=("limit", "used"),
                                                              equal=(("limit", "quota"),)),
        ("quota",), rule="quota")
lie("mm-alloc-out-of-range", "vaddr at the user top", M, "alloc", C,
    lambda s: {"pages": 1, "prot": RW, "vaddr": s.user_top}, refused(E.EINVAL, "vaddr"), rule="beyond user space")
lie("mm-alloc-out-of-range", "unaligned vaddr", M, "alloc", C,
    lambda s: {"pages": 1, "prot": RW, "vaddr": PROBE_VA + 1}, refused(E.EINVAL, "vaddr"), rule="alignment")
lie("mm-alloc-out-of-range", "0 pages", M, "alloc", C, lambda s: {"pages": 0, "prot": RW}, refused(E.EINVAL, "pages"),
    rule="args")
lie("mm-alloc-out-of-range", "prot 0", M, "alloc", C, lambda s: {"pages": 1, "prot": 0}, refused(E.EINVAL, "prot"),
    rule="args")

# -- requests that would expand into work: counts checked by arithmetic first --------------------------------

lie("expanding-runs", "a client's map of one run of 2**30 frames", K, "map", C,
    lambda s: {"vaddr": PROBE_VA, "frames": [[s.shared, 1 << 30]], "prot": PROT_READ}, refused(E.E2BIG),
    ("pid", "shared"), rule="client_size")
lie("expanding-runs", "a client's unmap of 2**20 pages", K, "unmap", C,
    lambda s: {"vaddr": 0, "pages": 1 << 20}, refused(E.E2BIG), ("pid",), rule="client_size")
lie("expanding-runs", "16 runs of 2**36 frames", K, "map", C,
    lambda s: {"vaddr": PROBE_VA, "frames": [[s.shared, 1 << 36]] * CLIENT_RUNS, "prot": PROT_READ},
    refused(E.E2BIG), ("pid", "shared"), rule="client_size")
lie("expanding-runs", "frame_info of everything, as a client", K, "frame_info", C,
    lambda s: {"frames": [[0, s.frames]] * 16}, refused(E.EPERM), rule="caller")
lie("expanding-runs", "an alloc of more pages than one call takes", M, "alloc", C,
    lambda s: {"pages": MAX_PAGES_PER_CALL + 1, "prot": RW}, refused(E.EINVAL, "pages"), rule="args")
lie("expanding-runs", "an alloc past the mm's per-alloc limit", M, "alloc", C,
    lambda s: {"pages": MAX_PAGES_PER_CALL, "prot": RW}, refused(E.EINVAL, "pages"), rule="max_alloc")
lie("expanding-runs", "a free of 2**20 pages", M, "free", C, lambda s: {"vaddr": 0, "pages": MAX_PAGES_PER_CALL},
    refused(E.EINVAL), rule="no allocation starts there")

# -- bytes and envelopes --------------------------------------------------------------------------------------

GARBAGE = (b"\xc1\xc1\xc1", b"", b"\xff" * 64, b"GET / HTTP/1.0\r\n\r\n", wire.encode([1, 2, 3]), wire.encode("ping"),
           b"\x85\xa1v")
_ARGS = b"\x84\xa1v\x01\xa2id\x01\xa4call\xa4ping\xa4args"  # a ping envelope up to its args (id 1)
for _srv in (K, M):
    _p = "" if _srv == K else "mm-"
    for _i, _g in enumerate(GARBAGE):
        lie(f"{_p}garbage-bytes", f"garbage {_i}", _srv, "?", C, lambda s, g=_g: Raw(g), refused(E.EPROTO),
            rule="envelope")
    for _label, _env, _exp in (
        ("version 2", {"v": 2, "id": RID, "call": "ping", "args": {}}, refused(E.EPROTO)),
        ("negative id", {"v": 1, "id": -1, "call": "ping", "args": {}}, refused(E.EPROTO)),
        ("string id", {"v": 1, "id": "1", "call": "ping", "args": {}}, refused(E.EPROTO)),
        ("no id", {"v": 1, "call": "ping", "args": {}}, refused(E.EPROTO)),
        ("call name of 1000 bytes", {"v": 1, "id": RID, "call": "p" * 1000, "args": {}}, refused(E.E2BIG)),
        ("call name of 40 bytes", {"v": 1, "id": RID, "call": "p" * 40, "args": {}}, refused(E.EPROTO)),
        ("args a list", {"v": 1, "id": RID, "call": "ping", "args": [1]}, refused(E.EPROTO)),
        ("an identity smuggled in", {"v": 1, "id": RID, "call": "ping", "args": {}, "identity": "x" * 40},
         refused(E.EPROTO)),
    ):
        lie(f"{_p}bad-envelope", _label, _srv, "ping", C, lambda s, e=_env: Envelope(e), _exp, rule="envelope")
    # containers past the decoder's limits, announced in a few bytes: refused before anything is built
    for _label, _data, _exp in (
        ("an array that claims 2**32 items", _ARGS + b"\x81\xa1x\xdd\xff\xff\xff\xff", refused(E.E2BIG)),
        ("a map that claims 2**32 keys", _ARGS + b"\xdf\xff\xff\xff\xff", refused(E.E2BIG)),
        ("a string that claims 2**32 bytes and ends", _ARGS + b"\x81\xa1x\xdb\xff\xff\xff\xff", refused(E.EPROTO)),
        ("a string of 300 bytes", _ARGS + b"\x81\xa1x\xda\x01\x2c" + b"x" * 300, refused(E.E2BIG)),
        ("an array of 1025 items", _ARGS + b"\x81\xa1x\xdc\x04\x01" + b"\x00" * 1025, refused(E.E2BIG)),
        ("arrays nested 3000 deep", _ARGS + b"\x81\xa1x" + b"\x91" * 3000 + b"\x00", refused(E.EPROTO)),
    ):
        lie(f"{_p}container-limits", _label, _srv, "?", C, lambda s, d=_data: Raw(d), _exp, rule="size")
    lie(f"{_p}oversized-message", "5 KiB", _srv, "ping", C,
        lambda s: Raw(wire.encode({"v": 1, "id": 1, "call": "ping", "args": {"pad": [b"x" * 200] * 25}})),
        refused(E.E2BIG), rule="size")
    lie(f"{_p}oversized-message", "33 KiB", _srv, "ping", C,
        lambda s: Raw(wire.encode({"v": 1, "id": 1, "call": "ping", "args": {"pad": [b"x" * 250] * 135}})),
        refused(E.E2BIG), rule="size")
    lie(f"{_p}oversized-message", "100 KiB (the transport drops it)", _srv, "ping", C,
        lambda s: Raw(b"\x00" * (100 << 10)), NO_REPLY, rule="transport")
    lie(f"{_p}unknown-call", "format_disk", _srv, "format_disk", C, lambda s: {}, refused(E.ENOSYS), rule="call")
    lie(f"{_p}unknown-call", "__init__", _srv, "__init__", C, lambda s: {}, refused(E.ENOSYS), rule="call")
    lie(f"{_p}unknown-call", "the other server's call", _srv, "alloc" if _srv == K else "donate", C, lambda s: {},
        refused(E.ENOSYS), rule="call")
    lie(f"{_p}multi-frame", "two frames", _srv, "ping", C, lambda s: {}, refused(E.EPROTO), via=Via.TWO_FRAMES,
        rule="envelope")
    lie(f"{_p}multi-frame", "three frames", _srv, "ping", C, lambda s: {}, refused(E.EPROTO), via=Via.THREE_FRAMES,
        rule="envelope")

for _label, _call, _args, _field in (
        ("tid '1'", "thread_destroy", {"tid": "1"}, "tid"), ("tid 1.0", "thread_destroy", {"tid": 1.0}, "tid"),
        ("tid true", "thread_destroy", {"tid": True}, "tid"),
        ("vaddr '4096'", "unmap", {"vaddr": "4096", "pages": 1}, "vaddr"),
        ("prot '1'", "map", {"vaddr": PROBE_VA, "frames": [[1, 1]], "prot": "1"}, "prot")):
    lie("wrong-types", _label, K, _call, C, lambda s, a=_args: a, refused(E.EINVAL, _field), ("pid",), rule="args")
lie("wrong-types", "count 1.5 (a call it may not make)", K, "reclaim", C, lambda s: {"count": 1.5}, refused(E.EPERM),
    rule="caller")
for _label, _call, _args, _field in (
        ("pages '1'", "alloc", {"pages": "1", "prot": RW}, "pages"),
        ("pages 1.0", "alloc", {"pages": 1.0, "prot": RW}, "pages"),
        ("prot true", "alloc", {"pages": 1, "prot": True}, "prot"),
        ("vaddr '0'", "free", {"vaddr": "0", "pages": 1}, "vaddr"),
        ("peer 5", "share", {"vaddr": 0, "pages": 1, "peer": 5}, "peer"),
        ("offer '1'", "accept", {"offer": "1"}, "offer")):
    lie("mm-wrong-types", _label, M, _call, C, lambda s, a=_args: a, refused(E.EINVAL, _field), rule="args")
lie("unknown-fields", "ping with an identity", K, "ping", C, lambda s: {"as": s.mm_key}, refused(E.EINVAL, "as"),
    rule="args")
lie("unknown-fields", "thread_create with a pid", K, "thread_create", C, lambda s: {"pid": 1},
    refused(E.EINVAL, "pid"), ("pid",), rule="args")
lie("mm-unknown-fields", "alloc with an owner", M, "alloc", C, lambda s: {"pages": 1, "prot": RW, "owner": s.me},
    refused(E.EINVAL, "owner"), rule="args")
lie("mm-unknown-fields", "share with the peer's vaddr (the old share)", M, "share", C,
    lambda s: {"vaddr": s.own_rw, "pages": 1, "peer": s.unknown, "prot": PROT_READ, "peer_vaddr": PROBE_VA},
    refused(E.EINVAL, "peer_vaddr"), ("own_rw", "unknown"), rule="args")

# -- the holder of the mm's key: what the kernel refuses even to its memory manager ---------------------------


lie("mm-key-donate", "a mapped user frame", K, "donate", MK, lambda s: {"frames": [[s.user_mapped, 1]]},
    refused(E.EBUSY), ("user_mapped",), rule="mapped")
lie("mm-key-donate", "a kernel frame", K, "donate", MK, lambda s: {"frames": [[s.kernel_frame, 1]]},
    refused(E.EEXIST), ("kernel_frame",), rule="kernel_owned")
lie("mm-key-donate", "the same frame twice in one call", K, "donate", MK,
    lambda s: {"frames": [[s.user_free, 1], [s.user_free, 1]]}, refused(E.EINVAL), ("user_free",), rule="duplicate")
lie("mm-key-donate", "frames beyond memory", K, "donate", MK, lambda s: {"frames": [[s.frames, 2]]},
    refused(E.EINVAL), rule="beyond_memory")
lie("mm-key-reclaim", "a kernel frame in use", K, "reclaim", MK, lambda s: {"frames": [[s.kernel_used, 1]]},
    refused(E.EBUSY), ("kernel_used",), rule="in_use")
lie("mm-key-reclaim", "a user frame", K, "reclaim", MK, lambda s: {"frames": [[s.user_free, 1]]}, refused(E.EINVAL),
    ("user_free",), rule="user_owned")
lie("mm-key-reclaim", "a kernel-shared frame", K, "reclaim", MK, lambda s: {"frames": [[s.shared, 1]]},
    refused(E.EBUSY), ("shared",), rule="in_use")
lie("mm-key-map", "a kernel frame writable", K, "map", MK,
    lambda s: {"pid": s.target_pid, "vaddr": PROBE_VA, "frames": [[s.kernel_frame, 1]], "prot": RW},
    refused(E.EPERM), ("target_pid", "kernel_frame"), rule="kernel_owned")
lie("mm-key-map", "a kernel-shared frame writable", K, "map", MK,
    lambda s: {"pid": s.target_pid, "vaddr": PROBE_VA, "frames": [[s.shared, 1]], "prot": RW}, refused(E.EPERM),
    ("target_pid", "shared"), rule="shared_read_only")
lie("mm-key-map", "W+X", K, "map", MK,
    lambda s: {"pid": s.target_pid, "vaddr": PROBE_VA, "frames": [[s.user_free, 1]], "prot": 7},
    refused(E.ENOTSUP), ("target_pid", "user_free"), rule="write_exec")
lie("mm-key-map", "no pid", K, "map", MK, lambda s: {"vaddr": PROBE_VA, "frames": [[s.user_free, 1]], "prot": 1},
    refused(E.EINVAL), ("user_free",), rule="pid_missing")
lie("mm-key-map", "a process that does not exist", K, "map", MK,
    lambda s: {"pid": 10 ** 12, "vaddr": PROBE_VA, "frames": [[s.user_free, 1]], "prot": 1}, refused(E.ESRCH),
    ("user_free",), rule="no_process")
lie("mm-key-proc", "a process for the mm's own key", K, "proc_create", MK,
    lambda s: {"key": s.mm_key, "kernel_quota": 16}, refused(E.EINVAL), ("mm_key",), rule="server_key")
lie("mm-key-proc", "destroy a process that does not exist", K, "proc_destroy", MK, lambda s: {"pid": 10 ** 12},
    refused(E.ESRCH), rule="no_process")


# ---- checks of more than one request, and the resource attacks ------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind ``mmsim client attack --kind`` knows."""

    kind: str
    server: str  # "kernel", "mm" or "both"
    what: str  # "lies" (single requests of this catalogue), "procedure" or "class"
    expected: str  # what it expects, in a few words
    doc: str
    chaos: bool = True  # may ``mmsim chaos`` pick it (quick, and leaves the system as it found it)
    teller: Teller = Teller.CLIENT


PROCEDURES: list[Kind] = [
    Kind("flood", K, "procedure", "all answered", "5000 requests in flight at once (pings, hellos, unknown calls, "
         "bad fields): each answered correctly"),
    Kind("mm-flood", M, "procedure", "all answered", "3000 requests in flight at once to the mm: each answered "
         "correctly, or EAGAIN past the requests a caller may have waiting"),
    Kind("replay-different", K, "procedure", "EINVAL(field=id)", "a ping's request id used again for thread_create"),
    Kind("mm-replay-different", M, "procedure", "EINVAL(field=id)", "a ping's request id used again for an alloc"),
    Kind("replay-identical", K, "procedure", "same tid, one thread", "thread_create sent twice with the same id: "
         "executed once, the same answer twice"),
    Kind("mm-replay-alloc", M, "procedure", "same vaddr, one allocation", "alloc sent twice with the same id: one "
         "allocation, the same answer twice"),
]

CLASSES: list[Kind] = [
    Kind("stranger-flood", "both", "class", "no reply; victim unharmed", "handshakes and requests from keys nobody "
         "admitted, at full speed: never served; an honest client beside it keeps its rate, process and replies",
         teller=Teller.NOBODY),
    Kind("costly-requests", "both", "class", "E2BIG/EPROTO/EINVAL; victim unharmed", "the costliest requests under "
         "the size limits, six in flight, to the kernel and the mm in turn (deep, long and wide containers, runs "
         "that would expand, long strings, listings): each refused exactly; the victim's p99 stays bounded and its "
         "lease holds"),
    Kind("kernel-frames", K, "class", "ENOMEM{limit,used}; victim unharmed", "threads, endpoints and page tables "
         "(sparse read-only maps) up to and past the attacker's kernel quota: ENOMEM naming its own limit; the victim "
         "never gets ENOMEM"),
    Kind("share-laundering", M, "class", "ENOMEM(quota); pair within quotas", "alloc, offer to a colluding peer, "
         "accept, free, repeat: each mapper is charged, the pair never holds more than their two quotas; the victim "
         "never gets ENOMEM"),
    Kind("unsolicited-mapping", M, "class", "offers only; ESRCH; nothing mapped", "offers to the victim (never "
         "accepted), shares to keys nobody admitted, to admitted keys with no process, to a revoked key; accepts "
         "of offers made to others: nothing appears in the victim's address space and no process is made"),
    Kind("many-keys", M, "class", "grants stop at the budget", "many admitted keys each take their whole quota: "
         "quotas are granted until the budget is used, then ENOMEM and nothing is made; the victim still gets "
         "memory within its quota", chaos=False),
    Kind("refused-creates-nothing", M, "class", "refused; no process, no charge", "an admitted key with no process "
         "sends requests the mm refuses (W+X, past its quota, beyond user space, shares and accepts): no process, no "
         "client record, no charge"),
    Kind("replay-cache-flood", "both", "class", "same reply, executed once", "thousands of admitted keys call both "
         "servers between a live client's request and its retry: the retry is answered from the cache, not run "
         "twice", chaos=False),
    Kind("unread-replies", "both", "class", "bounded; EAGAIN past the queue", "requests at full speed whose "
         "replies are never read: the servers drop replies past the queue, the mm refuses requests past a caller's "
         "queue (EAGAIN), memory stays bounded, the victim is unharmed"),
    Kind("stats-bounded", "both", "class", "EPERM listing; bounded answers", "stats and listings at full speed, to the "
         "kernel and the mm in turn: the listing refused to clients, every answer small whatever the number of "
         "processes; the victim unharmed"),
]


def _lie_kinds() -> list[Kind]:
    out: dict[str, Kind] = {}
    for x in LIES:
        if x.teller is Teller.MM_KEY:
            continue  # a live attacker never holds the mm's key (the simulator tells these)
        k = out.get(x.kind)
        if k is None:
            out[x.kind] = Kind(x.kind, x.server, "lies", x.expect.describe(), x.label, teller=x.teller)
        elif x.expect.describe() not in k.expected.split("/"):
            out[x.kind] = Kind(k.kind, k.server, "lies", f"{k.expected}/{x.expect.describe()}", k.doc, teller=k.teller)
    return list(out.values())


KINDS: dict[str, Kind] = {k.kind: k for k in _lie_kinds() + PROCEDURES + CLASSES}


def lies_of(kind: str) -> list[Lie]:
    return [x for x in LIES if x.kind == kind]


def by_teller(teller: Teller) -> list[Lie]:
    return [x for x in LIES if x.teller is teller]


def chaos_kinds() -> list[str]:
    """The kinds ``mmsim chaos`` may pick."""
    return sorted(k for k, v in KINDS.items() if v.chaos)


__all__ = ["CLASSES", "KINDS", "LIES", "NO_REPLY", "PROCEDURES", "RID", "Envelope", "Expect", "Kind", "Lie", "Other",
           "Raw", "Scene", "Teller", "Via", "answered", "by_teller", "chaos_kinds", "describe", "judge", "lies_of",
           "refused", "verdict_error", "verdict_no_reply"]
