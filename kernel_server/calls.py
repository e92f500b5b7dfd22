"""The kernel's calls, in one table: each call's arguments, who may make it, whether it changes
state, and the documented order in which its rules are checked (which errno wins when a request
breaks several).

``CALLS[name]`` is a ``KernelCall``. Everything that needs to know the calls reads this table:
the service validates arguments with ``ADAPTERS`` (built once, from the models of
``protocol.calls``), ``KernelCore`` dispatches on it and checks the caller's rule (``Who``)
before anything else, the invariant checkers and the simulator ask ``mutates``, and the
precedence tests walk ``rules``.

Who may call (``Who``), checked first, with these refusals:

- ``ANYONE``: everyone, a caller with no process included.
- ``MM``: the memory manager only (EPERM "only the memory manager may <verb>").
- ``READER``: the memory manager or the operator (EPERM "only the memory manager and the
  operator may <verb>"): reads of the frame table, of mappings, of events.
- ``PROCESS``: a caller that has a process, acting on it (ESRCH "the caller has no process").
- ``MM_OR_OWN``: map and unmap: the memory manager on any process (it names ``pid``), or a
  caller on its own process (it may name its own pid). The target is resolved after the
  arguments are validated (it needs ``pid``).

The order every request goes through (``COMMON``), then the call's own ``rules`` in order. The
first rule broken is the answer; later ones are not looked at. Rules marked "arithmetic" are
decided from the numbers in the request (run counts, the range, the quota) before the kernel
expands a single run into frames, so what a refused request costs does not grow with what it
names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from protocol import calls as P
from protocol.errors import Errno


class Who(enum.Enum):
    ANYONE = "anyone"
    MM = "mm"
    READER = "mm or operator"
    PROCESS = "a caller with a process"
    MM_OR_OWN = "mm, or a caller on its own process"


@dataclass(frozen=True)
class Rule:
    """One refusal: its ``name``, the errno it gives, a phrase every such refusal's message contains
    (``says``) and what breaks it."""

    name: str
    errno: Errno
    says: str
    when: str


@dataclass(frozen=True)
class KernelCall:
    name: str
    model: type[P.Args]
    who: Who
    mutates: bool
    verb: str  # "only the memory manager may <verb>"
    rules: tuple[Rule, ...]  # the call's own rules, in the order they are checked
    adapter: TypeAdapter

    def rule(self, name: str) -> Rule:
        """The rule ``name`` of this call (or of ``COMMON``)."""
        for r in COMMON + self.rules:
            if r.name == name:
                return r
        raise KeyError(f"{self.name} has no rule {name!r}")


# The checks every request goes through before its call's own rules, in this order.
COMMON: tuple[Rule, ...] = (
    Rule("size", Errno.E2BIG, "exceeds", "a message beyond the size limit (a smaller one for anyone but the mm "
         "and the operator) or a msgpack length limit"),
    Rule("envelope", Errno.EPROTO, "", "undecodable bytes, or an envelope that is not {v, id, call, args}"),
    Rule("unauthenticated", Errno.EPERM, "unauthenticated", "no CURVE identity (servers never see one)"),
    Rule("call", Errno.ENOSYS, "unknown call", "a call name the kernel does not have"),
    Rule("caller", Errno.EPERM, "only the memory manager", "the caller's identity may not make this call (MM, "
         "READER calls)"),
    Rule("caller_process", Errno.ESRCH, "has no process", "PROCESS calls: the caller has no process (at the same "
         "place as \"caller\")"),
    Rule("client_size", Errno.E2BIG, "a client maps or unmaps at most", "map and unmap by anyone but the mm: more "
         "runs or pages than one client call may; arithmetic on the raw counts, before the arguments are "
         "validated"),
    Rule("args", Errno.EINVAL, "args.", "arguments of the wrong type or shape, unknown or missing: the message "
         "and the ``field`` detail name the first one"),
)

# a map by the memory manager or a client; unmap likewise (MM_OR_OWN)
_TARGET = (
    Rule("pid_missing", Errno.EINVAL, "must name the process", "the memory manager did not name pid"),
    Rule("no_process", Errno.ESRCH, "no process", "pid names no process, or the caller has none"),
    Rule("other_process", Errno.EPERM, "own address space", "a client names another process's pid"),
)
_RUNS = (
    Rule("beyond_memory", Errno.EINVAL, "beyond physical memory", "arithmetic: a run reaches past the frame table"),
    Rule("duplicate", Errno.EINVAL, "appears twice", "arithmetic: two runs share a frame"),
)

_TABLE: tuple[tuple[str, type[P.Args], Who, bool, str, tuple[Rule, ...]], ...] = (
    ("hello", P.Empty, Who.ANYONE, False, "say hello", ()),
    ("address_map", P.Empty, Who.ANYONE, False, "read the address map", ()),
    ("ping", P.Empty, Who.ANYONE, False, "ping", ()),
    ("stats", P.Stats, Who.ANYONE, False, "list processes", (
        Rule("listing", Errno.EPERM, "only the memory manager and the operator", "from_pid (the per-process "
             "listing) asked by a caller that is not a reader"),
    )),
    ("proc_create", P.ProcCreate, Who.MM, True, "create processes", (
        Rule("server_key", Errno.EINVAL, "cannot own a process", "key is the mm's or the operator's"),
        Rule("has_process", Errno.EBUSY, "already has process", "key already has a process"),
        Rule("quota_below_cost", Errno.EINVAL, "a process needs at least", "kernel_quota below what a process "
             "costs (hello.process_cost)"),
        Rule("pool", Errno.ENOMEM, "unreserved", "kernel_quota beyond the free frames no quota reserves "
             "(details: needed, available); the mm donates and retries"),
    )),
    ("proc_destroy", P.ProcDestroy, Who.MM, True, "destroy processes", (
        Rule("no_process", Errno.ESRCH, "no process", "pid names no process"),
    )),
    ("donate", P.Donate, Who.MM, True, "donate frames", _RUNS + (
        Rule("not_ram", Errno.EINVAL, "is not RAM", "a frame that is a hole or reserved"),
        Rule("kernel_owned", Errno.EEXIST, "already kernel-owned", "a frame the kernel owns"),
        Rule("mapped", Errno.EBUSY, "is mapped in user space", "a user frame that is mapped"),
        Rule("not_eligible", Errno.EINVAL, "cannot be kernel-owned", "a frame the profile cannot give the kernel "
             "(i686-pae: at or above 4 GiB)"),
    )),
    ("reclaim", P.Reclaim, Who.MM, True, "reclaim frames", _RUNS + (
        Rule("not_ram", Errno.EINVAL, "is not RAM", "frames: a hole or reserved frame"),
        Rule("user_owned", Errno.EINVAL, "is not kernel-owned", "frames: a user frame"),
        Rule("in_use", Errno.EBUSY, "is in use", "frames: a kernel frame in use (or kernel-shared)"),
        Rule("reserved", Errno.EBUSY, "reserved", "frames: more than the free frames no quota reserves "
             "(count takes at most those, never fails)"),
    )),
    ("map", P.Map, Who.MM_OR_OWN, True, "map", _TARGET + (
        Rule("write_exec", Errno.ENOTSUP, "W+X", "prot both writable and executable"),
        Rule("no_large_pages", Errno.ENOTSUP, "has no large pages", "large asked on a profile without them"),
        Rule("page_size", Errno.EINVAL, "args.page_size", "a page size the profile does not have"),
        Rule("alignment", Errno.EINVAL, "is not aligned", "vaddr not aligned to the page size"),
        Rule("user_space", Errno.EINVAL, "beyond user space", "arithmetic: vaddr + pages past the end of user space"),
        Rule("beyond_memory", Errno.EINVAL, "beyond physical memory", "arithmetic: a run reaches past the frame "
             "table"),
        Rule("large_shape", Errno.EINVAL, "a large page needs", "arithmetic: frames that are not whole, aligned, "
             "contiguous large pages"),
        Rule("quota", Errno.ENOMEM, "kernel quota", "arithmetic: the page tables the range lacks take the process "
             "past its kernel quota (details: needed, limit, used, pid)"),
        Rule("not_ram", Errno.EINVAL, "is not RAM", "a frame that is a hole or reserved"),
        Rule("large_not_user", Errno.EPERM, "every frame user-owned", "a large page over a frame that is not "
             "user-owned"),
        Rule("client_not_shared", Errno.EPERM, "only kernel-shared frames", "a client maps a frame that is not "
             "kernel-shared"),
        Rule("kernel_owned", Errno.EPERM, "is kernel-owned", "a kernel frame that is not kernel-shared"),
        Rule("shared_read_only", Errno.EPERM, "read-only mappings only", "a kernel-shared frame with more than "
             "PROT_READ"),
        Rule("busy", Errno.EBUSY, "already mapped", "a page of the range is mapped (small or large)"),
    )),
    ("unmap", P.Unmap, Who.MM_OR_OWN, True, "unmap", _TARGET + (
        Rule("alignment", Errno.EINVAL, "is not page-aligned", "vaddr not page-aligned"),
        Rule("user_space", Errno.EINVAL, "beyond user space", "arithmetic: the range goes past user space"),
        Rule("hole", Errno.EINVAL, "nothing is mapped", "a page of the range maps nothing"),
        Rule("cuts_large", Errno.EINVAL, "cuts the large page", "the range covers part of a large page"),
        Rule("made_by_mm", Errno.EPERM, "mapped by the memory manager", "a client unmaps a mapping the mm made"),
    )),
    ("thread_create", P.Empty, Who.PROCESS, True, "create threads", (
        Rule("quota", Errno.ENOMEM, "kernel quota", "the thread's frame takes the process past its quota"),
    )),
    ("thread_destroy", P.ThreadDestroy, Who.PROCESS, True, "destroy threads", (
        Rule("no_thread", Errno.ESRCH, "no thread", "tid names no thread of the caller's process"),
    )),
    ("endpoint_create", P.Empty, Who.PROCESS, True, "create endpoints", (
        Rule("quota", Errno.ENOMEM, "kernel quota", "a new slab frame takes the process past its quota"),
    )),
    ("endpoint_destroy", P.EndpointDestroy, Who.PROCESS, True, "destroy endpoints", (
        Rule("no_endpoint", Errno.ESRCH, "no endpoint", "eid names no endpoint of the caller's process"),
    )),
    ("frame_info", P.FrameInfo, Who.READER, False, "read the frame table", (
        Rule("beyond_memory", Errno.EINVAL, "beyond physical memory", "arithmetic: a run past the frame table"),
    )),
    ("mappings", P.Mappings, Who.READER, False, "list a process's mappings", (
        Rule("no_process", Errno.ESRCH, "no process", "pid names no process"),
        Rule("alignment", Errno.EINVAL, "is not page-aligned", "vaddr not page-aligned"),
        Rule("user_space", Errno.EINVAL, "beyond user space", "arithmetic: the range goes past user space"),
    )),
    ("events", P.Events, Who.READER, False, "read kernel events", ()),
)

CALLS: dict[str, KernelCall] = {
    name: KernelCall(name, model, who, mutates, verb, rules, TypeAdapter(model))
    for name, model, who, mutates, verb, rules in _TABLE
}
ADAPTERS: dict[str, TypeAdapter] = {name: c.adapter for name, c in CALLS.items()}  # for protocol.calls.validate
MUTATING = frozenset(name for name, c in CALLS.items() if c.mutates)


def describe() -> list[dict[str, Any]]:
    """The table as plain data (for docs and tools): name, who, mutates, and the rules in order."""
    return [{"call": c.name, "who": c.who.value, "mutates": c.mutates,
             "rules": [(r.name, r.errno.name, r.when) for r in COMMON + c.rules]} for c in CALLS.values()]


__all__ = ["ADAPTERS", "CALLS", "COMMON", "MUTATING", "KernelCall", "Rule", "Who", "describe"]
