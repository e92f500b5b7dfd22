"""Hand-written cases, from the call table (``kernel_server.calls``): for every call, on every profile,
its ordinary success, each of its rules broken alone, and rules broken in pairs (the earlier rule in
the documented order must win); then scenarios of the design (donate and reclaim with an empty
pool, quotas and reservations, large pages, a process's end).

Each rule case starts from the same state (``Setup``): two processes (client-0 with room in its
quota, client-1 with exactly the cost of a process), an mm mapping and a client's own read-only map
of a boot-image frame in client-0, a thread, an endpoint, a large page, and four frames donated last
(free kernel frames whatever the kernel allocated). A breaker is an override of the request:
argument changes, ``_as`` (another caller), ``DROP`` (an argument removed); two breakers of the
same ``frames`` list combine by concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kernel_server.arch import PAGE_SHIFT, PAGE_SIZE, get_profile
from kernel_server.bootmap import MiB, pc_map
from kernel_server.calls import CALLS, COMMON
from kernel_server.conformance.cases import Case, Step
from kernel_server.core import MAX_CLIENT_PAGES, MAX_CLIENT_RUNS

PROFILES = ("i686", "i686-pae", "x86_64")
MEMORY = 16 * MiB
POOL = 64
V = 0x1000_0000  # small pages
VL = 0x4000_0000  # a large page (aligned for every size)
VL2 = 0x8000_0000
READ, RW, WX = 1, 3, 6
DROP = "$drop"
PAIRS_PER_RULE = 3  # later rules each rule is paired with, at most


def key(role: str) -> dict[str, str]:
    return {"$key": role}


def regions_of(bm) -> list[tuple[str, int, int]]:
    return [(r.kind, r.first, r.count) for r in bm.regions]


@dataclass
class Setup:
    """The state every rule case of a profile starts from, and the frames worth naming in it."""

    arch: str
    pool: int = POOL

    def __post_init__(self) -> None:
        p = get_profile(self.arch)
        self.profile = p
        bm = pc_map(p, MEMORY, self.pool)
        self.regions = regions_of(bm)
        self.n = bm.span
        self.cost = 1 if p.root_is_slab else 2
        self.step = p.pages_at(max(p.large_levels))  # frames of the smallest large page
        self.page = self.step * PAGE_SIZE
        self.top = p.user_top
        user = bm.of_kind("user")[0]
        self.u0 = user.first  # u0, u0+1 mapped by the mm at V
        self.free_user = user.first + 3
        self.d0 = user.first + 8  # d0..d0+3 donated last
        self.image = bm.of_kind("kernel_image")[0].first
        self.ftab = bm.of_kind("frame_table")[0].first
        blocks = [b for b in range(0, self.n, self.step) if user.first <= b and b + self.step <= user.end]
        self.block, self.block2 = blocks[0], blocks[1]
        self.top_block = (self.n // self.step - 1) * self.step  # ends in the firmware: RAM, not all user

    def steps(self) -> list[Step]:
        return [
            Step("mm", "proc_create", {"key": key("client-0"), "kernel_quota": 16}),
            Step("mm", "proc_create", {"key": key("client-1"), "kernel_quota": self.cost}),
            Step("mm", "map", {"pid": 1, "vaddr": V, "frames": [[self.u0, 2]], "prot": RW}),
            Step("client-0", "map", {"vaddr": V + 2 * PAGE_SIZE, "frames": [[self.image, 1]], "prot": READ}),
            Step("client-0", "thread_create"),
            Step("client-0", "endpoint_create"),
            Step("mm", "map", {"pid": 1, "vaddr": VL, "frames": [[self.block, self.step]], "prot": READ,
                               "large": True}),
            Step("mm", "donate", {"frames": [[self.d0, 4]]}),
        ]


def pairs(s: Setup) -> dict[tuple[str, str], list[tuple[str, str, dict[str, Any]]]]:
    """Rule pairs whose breakers change the same argument: (earlier, later, one override breaking both)."""
    return {
        ("unmap", "mm"): [("alignment", "user_space", {"vaddr": s.top - PAGE_SIZE + 1, "pages": 2}),
                          ("user_space", "hole", {"vaddr": s.top - PAGE_SIZE, "pages": 2}),
                          ("hole", "cuts_large", {"vaddr": VL - PAGE_SIZE, "pages": 2})],
        ("unmap", "client-0"): [("hole", "made_by_mm", {"vaddr": V + PAGE_SIZE, "pages": 3}),
                                ("cuts_large", "made_by_mm", {"vaddr": VL, "pages": 1})],
        ("map", "mm"): [("large_not_user", "busy", {"large": True, "vaddr": VL, "frames": [[s.top_block, s.step]]})],
    }


def breakers(s: Setup) -> dict[tuple[str, str], tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]]:
    """(call, who) -> (the valid request, [(rule, overrides), ...] in the documented order)."""
    big = {f"pad{i:02d}": "x" * 200 for i in range(24)}  # a client's message past 4 KiB
    mm_map = {"pid": 1, "vaddr": V + 8 * PAGE_SIZE, "frames": [[s.free_user, 1]], "prot": READ}
    own_map = {"vaddr": V + 16 * PAGE_SIZE, "frames": [[s.image + 1, 1]], "prot": READ}
    many = [[s.free_user + 2 * i, 1] for i in range(1000)]
    return {
        ("ping", "client-0"): ({}, [("size", big), ("args", {"other": 1})]),
        ("hello", "stranger"): ({}, [("args", {"other": 1})]),
        ("address_map", "operator"): ({}, [("args", {"other": 1})]),
        ("stats", "client-0"): ({}, [("args", {"limit": 0}), ("listing", {"from_pid": 0})]),
        ("stats", "mm"): ({"from_pid": 0}, [("args", {"limit": "all"})]),
        ("events", "mm"): ({}, [("caller", {"_as": "client-0"}), ("args", {"limit": 0})]),
        ("frame_info", "operator"): ({"frames": [[s.u0, 4]]}, [
            ("caller", {"_as": "client-0"}), ("args", {"frames": []}), ("beyond_memory", {"frames": [[s.n - 1, 2]]})]),
        ("mappings", "mm"): ({"pid": 1, "vaddr": V, "pages": 4}, [
            ("caller", {"_as": "stranger"}), ("args", {"pages": 0}), ("no_process", {"pid": 99}),
            ("alignment", {"vaddr": V + 1}), ("user_space", {"pages": (s.top >> PAGE_SHIFT) + 1})]),
        ("proc_create", "mm"): ({"key": key("client-2"), "kernel_quota": s.cost}, [
            ("size", {"_as": "client-0", **big}), ("caller", {"_as": "client-0"}), ("args", {"kernel_quota": 0}),
            ("server_key", {"key": key("mm")}), ("has_process", {"key": key("client-0")})]
            + ([("quota_below_cost", {"kernel_quota": 1})] if s.cost > 1 else [])
            + [("pool", {"kernel_quota": 1 << 20})]),
        ("proc_destroy", "mm"): ({"pid": 2}, [
            ("caller", {"_as": "client-1"}), ("args", {"pid": 0}), ("no_process", {"pid": 99})]),
        ("donate", "mm"): ({"frames": [[s.free_user, 1]]}, [
            ("size", {"_as": "client-0", "frames": many}), ("caller", {"_as": "client-0"}),
            ("args", {"frames": "all"}), ("beyond_memory", {"frames": [[s.n - 1, 2]]}),
            ("duplicate", {"frames": [[s.free_user + 1, 1], [s.free_user + 1, 1]]}),
            ("not_ram", {"frames": [[0, 1]]}), ("kernel_owned", {"frames": [[s.d0, 1]]}),
            ("mapped", {"frames": [[s.u0, 1]]})]),
        ("reclaim", "mm"): ({"frames": [[s.d0, 1]]}, [
            ("caller", {"_as": "client-0"}), ("args", {"frames": "x"}),
            ("beyond_memory", {"frames": [[s.n - 1, 2]]}),
            ("duplicate", {"frames": [[s.d0 + 1, 1], [s.d0 + 1, 1]]}),
            ("not_ram", {"frames": [[0, 1]]}), ("user_owned", {"frames": [[s.free_user, 1]]}),
            ("in_use", {"frames": [[s.ftab, 1]]}), ("reserved", {"frames": [{"$free": 0}]})]),
        ("map", "mm"): (mm_map, [
            ("args", {"prot": 0}), ("pid_missing", {"pid": DROP}), ("no_process", {"pid": 99}),
            ("write_exec", {"prot": WX}), ("page_size", {"page_size": 8192}),
            ("alignment", {"vaddr": V + 8 * PAGE_SIZE + 8}),
            ("user_space", {"vaddr": s.top - PAGE_SIZE, "frames": [[s.free_user, 2]]}),
            ("beyond_memory", {"frames": [[s.n, 1]]}),
            ("large_shape", {"large": True, "vaddr": VL2, "frames": [[s.block2 + 1, s.step]]}),
            ("quota", {"pid": 2}), ("not_ram", {"frames": [[0, 1]]}),
            ("large_not_user", {"large": True, "vaddr": VL2, "frames": [[s.top_block, s.step]]}),
            ("kernel_owned", {"frames": [[s.d0, 1]]}),
            ("shared_read_only", {"frames": [[s.image + 1, 1]], "prot": RW}),
            ("busy", {"vaddr": V})]),
        ("map", "client-0"): (own_map, [
            ("size", {"frames": many}),
            ("client_size", {"frames": [[s.image + i, 1] for i in range(MAX_CLIENT_RUNS + 1)]}),
            ("args", {"prot": 0}), ("no_process", {"_as": "client-2"}), ("other_process", {"pid": 2}),
            ("write_exec", {"prot": WX}), ("alignment", {"vaddr": V + 16 * PAGE_SIZE + 8}),
            ("client_not_shared", {"frames": [[s.free_user, 1]]}), ("shared_read_only", {"prot": RW}),
            ("busy", {"vaddr": V + 2 * PAGE_SIZE})]),
        ("unmap", "mm"): ({"pid": 1, "vaddr": V, "pages": 1}, [
            ("args", {"pages": 0}), ("pid_missing", {"pid": DROP}), ("no_process", {"pid": 99}),
            ("alignment", {"vaddr": V + 1}), ("user_space", {"vaddr": s.top - PAGE_SIZE, "pages": 2}),
            ("hole", {"vaddr": V + 100 * PAGE_SIZE}), ("cuts_large", {"vaddr": VL, "pages": 1})]),
        ("unmap", "client-0"): ({"vaddr": V + 2 * PAGE_SIZE, "pages": 1}, [
            ("client_size", {"pages": MAX_CLIENT_PAGES + 1}), ("args", {"pages": 0}),
            ("no_process", {"_as": "stranger"}), ("other_process", {"pid": 2}),
            ("alignment", {"vaddr": V + 2 * PAGE_SIZE + 1}), ("hole", {"vaddr": V + 3 * PAGE_SIZE}),
            ("cuts_large", {"vaddr": VL + PAGE_SIZE, "pages": 1}), ("made_by_mm", {"vaddr": V})]),
        ("thread_create", "client-0"): ({}, [
            ("caller_process", {"_as": "stranger"}), ("args", {"other": 1}), ("quota", {"_as": "client-1"})]),
        ("thread_destroy", "client-0"): ({"tid": 1}, [
            ("caller_process", {"_as": "client-2"}), ("args", {"tid": 0}), ("no_thread", {"tid": 99})]),
        ("endpoint_create", "client-0"): ({}, [
            ("caller_process", {"_as": "stranger"}), ("args", {"other": 1}), ("quota", {"_as": "client-1"})]),
        ("endpoint_destroy", "client-0"): ({"eid": 1}, [
            ("caller_process", {"_as": "client-2"}), ("args", {"eid": "1"}), ("no_endpoint", {"eid": 99})]),
    }


def _apply(base: dict[str, Any], who: str, *overs: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The request with ``overs`` applied in turn; None if two of them set one argument differently
    (two ``frames`` lists are concatenated)."""
    args = dict(base)
    touched: dict[str, Any] = {}
    for over in overs:
        for k, v in over.items():
            if k in touched and touched[k] != v:
                if k == "frames" and isinstance(v, list) and isinstance(touched[k], list) and v and touched[k]:
                    v = touched[k] + v
                else:
                    return None
            touched[k] = v
    for k, v in touched.items():
        if k == "_as":
            who = v
        elif v == DROP:
            args.pop(k, None)
        else:
            args[k] = v
    return who, args


def _order(call: str) -> list[str]:
    return [r.name for r in COMMON + CALLS[call].rules]


def rule_cases(arch: str) -> list[Case]:
    s = Setup(arch)
    setup = s.steps()
    out: list[Case] = []

    def case(cid: str, comment: str, call: str, who: str, args: dict[str, Any], rule: str | None,
             flags: list[str]) -> None:
        step = Step(who, call, args, rule=rule)
        out.append(Case(cid, comment, arch, s.regions, setup + [step], setup=len(setup), flags=flags,
                        optional="precedence" in flags))

    for (call, who), (base, rules) in breakers(s).items():
        order = _order(call)
        tag = f"{call}/{arch}/{who}"
        case(f"{tag}/ok", f"{call} by {who}: the valid request", call, who, dict(base), None, ["valid"])
        names = [r for r, _ in rules]
        assert names == sorted(names, key=order.index), (call, names)
        for i, (rule, over) in enumerate(rules):
            who1, args1 = _apply(base, who, over)
            case(f"{tag}/{rule}", f"{call} breaking only rule {rule!r} ({CALLS[call].rule(rule).when})", call, who1,
                 args1, rule, [f"rule:{call}.{rule}"])
            paired = 0
            for rule2, over2 in rules[i + 1:]:
                if paired == PAIRS_PER_RULE:
                    break
                got = _apply(base, who, over2, over)
                if got is None:
                    continue
                paired += 1
                who2, args2 = got
                case(f"{tag}/{rule}+{rule2}", f"{call} breaking {rule!r} and the later {rule2!r}: {rule!r} wins",
                     call, who2, args2, rule, [f"rule:{call}.{rule}", f"later:{call}.{rule2}", "precedence"])
    for (call, who), extra in pairs(s).items():
        tag = f"{call}/{arch}/{who}"
        for rule, rule2, over in extra:
            who2, args2 = _apply(breakers(s)[(call, who)][0], who, over)
            case(f"{tag}/{rule}+{rule2}", f"{call} breaking {rule!r} and the later {rule2!r} with one argument: "
                 f"{rule!r} wins", call, who2, args2, rule, [f"rule:{call}.{rule}", f"later:{call}.{rule2}",
                                                              "precedence"])
    out.extend(_unknown_call(s, setup))
    return out


def _unknown_call(s: Setup, setup: list[Step]) -> list[Case]:
    step = Step("mm", "nope", {}, rule="call", says="unknown call")
    big = Step("mm", "donate", {"frames": ["k" * 40] * 1024}, rule="size", says="exceeds")
    return [Case(f"nope/{s.arch}/mm/call", "a call the kernel does not have: ENOSYS", s.arch, s.regions,
                 setup + [step], setup=len(setup), flags=["rule:common.call"]),
            Case(f"donate/{s.arch}/mm/size-mm", "the mm's request past 32 KiB: E2BIG before anything is decoded",
                 s.arch, s.regions, setup + [big], setup=len(setup), flags=["rule:donate.size"])]


# ---- scenarios of the design -------------------------------------------------------------------------

def design_cases(arch: str) -> list[Case]:
    p = get_profile(arch)
    cost = 1 if p.root_is_slab else 2
    step = p.pages_at(max(p.large_levels))
    out: list[Case] = []

    def add(cid: str, comment: str, pool: int, steps: list[Step], flags: list[str], setup: int = 0,
            memory: int = MEMORY) -> None:
        bm = pc_map(p, memory, pool)
        out.append(Case(f"{cid}/{arch}", comment, arch, regions_of(bm), steps, setup=setup, flags=flags))

    bm0 = pc_map(p, MEMORY, POOL)  # (its user frames are user frames with any smaller pool too)
    u = bm0.of_kind("user")[0].first
    blocks = [b for b in range(0, bm0.span, step) if u <= b and b + step <= bm0.of_kind("user")[0].end]
    b0 = blocks[0]

    add("donate-reclaim/empty-pool", "with no free kernel frame at all, donate and reclaim work (they allocate "
        "nothing); reclaim {count} takes what is free and unreserved, never more", 0, [
            Step("mm", "reclaim", {"count": 1}),
            Step("mm", "stats"),
            Step("mm", "donate", {"frames": [[u, 4]]}),
            Step("mm", "reclaim", {"frames": [[u + 1, 2]]}),
            Step("mm", "reclaim", {"count": 8}),
            Step("mm", "reclaim", {"count": 1}),
        ], ["empty_pool", "donate", "reclaim"])
    add("proc-create/empty-pool", "proc_create with an empty pool: ENOMEM naming what it needs and what is free "
        "and unreserved; the mm donates and retries", 0, [
            Step("mm", "proc_create", {"key": key("client-0"), "kernel_quota": cost + 2}, rule="pool"),
            Step("mm", "donate", {"frames": [[u, cost + 1]]}),
            Step("mm", "proc_create", {"key": key("client-0"), "kernel_quota": cost + 2}, rule="pool"),
            Step("mm", "donate", {"frames": [[u + cost + 1, 1]]}),
            Step("mm", "proc_create", {"key": key("client-0"), "kernel_quota": cost + 2}),
            Step("client-0", "hello"),
        ], ["empty_pool", "quota", "reservation"])
    add("quota/reservation", "a process's whole quota is reserved at proc_create: proc_create and reclaim take "
        "only unreserved frames, and a process within its quota never gets ENOMEM even when nothing is "
        "unreserved", 0, [
            Step("mm", "donate", {"frames": [[u, 2 * cost + 6]]}),
            Step("mm", "proc_create", {"key": key("client-0"), "kernel_quota": cost + 4}),
            Step("mm", "proc_create", {"key": key("client-1"), "kernel_quota": cost + 3}, rule="pool"),
            Step("mm", "proc_create", {"key": key("client-1"), "kernel_quota": cost + 2}),
            Step("mm", "stats", {"from_pid": 0}),
            Step("client-0", "thread_create"),
            Step("client-0", "thread_create"),
            Step("client-0", "endpoint_create"),
            Step("client-0", "thread_create"),
            Step("client-0", "thread_create", rule="quota"),
            Step("client-0", "thread_destroy", {"tid": 2}),
            Step("client-1", "endpoint_create"),
            Step("client-1", "endpoint_create"),
            Step("client-1", "thread_create"),
            Step("client-1", "thread_create", rule="quota"),
            Step("mm", "stats"),
            Step("mm", "proc_destroy", {"pid": 1}),
            Step("mm", "events"),
            Step("mm", "reclaim", {"count": 100}),
        ], ["quota", "reservation"])
    add("quota/map-tables", "page tables are charged to the process: a map whose tables pass the quota is "
        "ENOMEM (needed, limit, used, pid) and maps nothing", 8, [
            Step("mm", "proc_create", {"key": key("client-0"), "kernel_quota": cost + 1}),
            Step("mm", "map", {"pid": 1, "vaddr": V, "frames": [[u, 3]], "prot": RW}, rule=None),
            Step("mm", "map", {"pid": 1, "vaddr": V + 3 * PAGE_SIZE, "frames": [[u + 3, 1]], "prot": READ}),
            Step("mm", "map", {"pid": 1, "vaddr": V + (1 << 31) - (1 << 28), "frames": [[u + 4, 1]], "prot": READ},
                 rule="quota"),
            Step("mm", "unmap", {"pid": 1, "vaddr": V, "pages": 4}),
            Step("mm", "stats", {"from_pid": 0}),
        ] if cost == 2 and p.levels == 2 else [
            Step("mm", "proc_create", {"key": key("client-0"), "kernel_quota": cost + p.levels - 1}),
            Step("mm", "map", {"pid": 1, "vaddr": V, "frames": [[u, 3]], "prot": RW}),
            Step("mm", "map", {"pid": 1, "vaddr": V + 3 * PAGE_SIZE, "frames": [[u + 3, 1]], "prot": READ}),
            Step("mm", "map", {"pid": 1, "vaddr": VL2, "frames": [[u + 4, 1]], "prot": READ}, rule="quota"),
            Step("mm", "unmap", {"pid": 1, "vaddr": V, "pages": 4}),
            Step("mm", "stats", {"from_pid": 0}),
        ], ["quota"])
    add("large-pages/lifecycle", "a large page: every frame user-owned, one reference on each, the frames of a "
        "mapped large page cannot be donated (EBUSY per 4 KiB frame), small maps inside it are EBUSY, a "
        "partial unmap cuts it (EINVAL), the whole unmap frees it", 32, [
            Step("mm", "proc_create", {"key": key("client-0"), "kernel_quota": 12}),
            Step("mm", "proc_create", {"key": key("client-1"), "kernel_quota": 12}),
            Step("mm", "map", {"pid": 1, "vaddr": VL, "frames": [[b0, step]], "prot": RW, "large": True}),
            Step("mm", "map", {"pid": 2, "vaddr": VL, "frames": [[b0, step]], "prot": READ,
                               "page_size": step * PAGE_SIZE}),
            Step("mm", "frame_info", {"frames": [[b0 - 1, step + 2]]}),
            Step("mm", "mappings", {"pid": 1, "vaddr": VL - PAGE_SIZE, "pages": step + 2}),
            Step("mm", "stats"),
            Step("mm", "donate", {"frames": [[b0 + 5, 1]]}, rule="mapped"),
            Step("mm", "map", {"pid": 1, "vaddr": VL + PAGE_SIZE, "frames": [[u, 1]], "prot": READ}, rule="busy"),
            Step("mm", "unmap", {"pid": 1, "vaddr": VL, "pages": step - 1}, rule="cuts_large"),
            Step("client-0", "unmap", {"vaddr": VL, "pages": step}, rule="client_size" if step > MAX_CLIENT_PAGES
                 else "made_by_mm"),
            Step("mm", "unmap", {"pid": 1, "vaddr": VL, "pages": step}),
            Step("mm", "proc_destroy", {"pid": 2}),
            Step("mm", "events"),
            Step("mm", "donate", {"frames": [[b0, 8]]}),
        ], ["large_pages"])
    if arch == "x86_64":
        add("large-pages/one-gib", "x86_64's 1 GiB page: on a 16 MiB machine its frames lie beyond physical "
            "memory; misaligned it is EINVAL; an unknown page size is EINVAL", 16, [
                Step("mm", "proc_create", {"key": key("client-0"), "kernel_quota": 12}),
                Step("mm", "map", {"pid": 1, "vaddr": 1 << 30, "frames": [[0, 1 << 18]], "prot": READ,
                                   "page_size": 1 << 30}, rule="beyond_memory"),
                Step("mm", "map", {"pid": 1, "vaddr": 1 << 21, "frames": [[0, 1 << 18]], "prot": READ,
                                   "page_size": 1 << 30}, rule="alignment"),
                Step("mm", "map", {"pid": 1, "vaddr": 1 << 30, "frames": [[b0, step]], "prot": READ,
                                   "page_size": 1 << 22}, rule="page_size"),
            ], ["large_pages"])
    add("process/lifecycle", "a process's whole life: its objects, its mappings (the mm's and its own), "
        "mappings listed, destroyed by the mm with everything released, and the event the mm reads", 16, [
            Step("mm", "proc_create", {"key": key("client-0"), "kernel_quota": 10, "user_quota": 64}),
            Step("client-0", "hello"),
            Step("client-0", "ping"),
            Step("client-0", "thread_create"),
            Step("client-0", "endpoint_create"),
            Step("client-0", "endpoint_create"),
            Step("client-0", "endpoint_destroy", {"eid": 1}),
            Step("mm", "map", {"pid": 1, "vaddr": V, "frames": [[u, 2], [u + 5, 1]], "prot": RW}),
            Step("client-0", "map", {"vaddr": V + 8 * PAGE_SIZE, "frames": [[256, 2]], "prot": READ}),
            Step("client-0", "stats"),
            Step("operator", "mappings", {"pid": 1, "vaddr": V, "pages": 16}),
            Step("mm", "mappings", {"pid": 1, "vaddr": V, "pages": 16, "max_segments": 1}),
            Step("client-0", "unmap", {"vaddr": V + 8 * PAGE_SIZE, "pages": 1}),
            Step("mm", "proc_destroy", {"pid": 1}),
            Step("mm", "events", {"since": 0, "limit": 10}),
            Step("client-0", "ping"),
            Step("client-0", "thread_create", rule="caller_process"),
            Step("mm", "proc_create", {"key": key("client-0"), "kernel_quota": 4}),
            Step("operator", "stats", {"from_pid": 0, "limit": 1}),
        ], ["process"])
    add("refcount/shared-frames", "the same frames in two processes: each mapping counts one reference; "
        "donate refuses them until the last mapping goes", 16, [
            Step("mm", "proc_create", {"key": key("client-0"), "kernel_quota": 8}),
            Step("mm", "proc_create", {"key": key("client-1"), "kernel_quota": 8}),
            Step("mm", "map", {"pid": 1, "vaddr": V, "frames": [[u, 2]], "prot": RW}),
            Step("mm", "map", {"pid": 2, "vaddr": V + PAGE_SIZE, "frames": [[u, 2]], "prot": READ}),
            Step("mm", "map", {"pid": 2, "vaddr": V + 4 * PAGE_SIZE, "frames": [[u + 1, 1]], "prot": READ}),
            Step("mm", "frame_info", {"frames": [[u, 3]]}),
            Step("mm", "unmap", {"pid": 1, "vaddr": V, "pages": 2}),
            Step("mm", "donate", {"frames": [[u, 2]]}, rule="mapped"),
            Step("mm", "proc_destroy", {"pid": 2}),
            Step("mm", "donate", {"frames": [[u, 2]]}),
            Step("mm", "frame_info", {"frames": [[u, 3]]}),
        ], ["refcount"])
    return out


def pae_high_cases() -> list[Case]:
    """i686-pae: frames at or above 4 GiB cannot be kernel-owned (a machine with RAM above the PCI hole)."""
    from kernel_server.bootmap import BYTES_PER_FRAME, frames as to_frames

    hi = 1 << 20  # the frame at 4 GiB
    table = to_frames((hi + 16) * BYTES_PER_FRAME)
    user = 256 + 32 + table + 16
    regions = [("reserved", 0, 256), ("kernel_image", 256, 32), ("frame_table", 288, table),
               ("kernel_pool", 288 + table, 16), ("user", user, 4096 - user), ("user", hi, 16)]
    boot = [Step("mm", "hello"), Step("mm", "address_map")]
    mapped = [Step("mm", "proc_create", {"key": key("client-0"), "kernel_quota": 4}),
              Step("mm", "map", {"pid": 1, "vaddr": V, "frames": [[hi, 4]], "prot": RW})]
    cid = "donate/i686-pae/above-4gib"
    why = ("i686-pae: the PDPT must be addressable by a 32-bit CR3, so no frame at or above 4 GiB may be "
           "donated (rule not_eligible, the last of donate's)")
    return [
        Case(cid, why, "i686-pae", regions, boot + [
            Step("mm", "donate", {"frames": [[hi, 2]]}, rule="not_eligible"),
            Step("mm", "donate", {"frames": [[user, 1], [hi + 3, 1]]}, rule="not_eligible"),
            Step("mm", "donate", {"frames": [[hi + 8, 8]]}, rule="not_eligible"),
            Step("mm", "donate", {"frames": [[user, 2]]})], setup=2, flags=["rule:donate.not_eligible", "pae"]),
        Case(f"{cid}/kernel_owned+not_eligible", why + "; a kernel-owned frame named with one above 4 GiB: EEXIST",
             "i686-pae", regions, boot + [Step("mm", "donate", {"frames": [[hi + 4, 1], [300, 1]]},
                                               rule="kernel_owned")], setup=2,
             flags=["rule:donate.kernel_owned", "later:donate.not_eligible", "precedence", "pae"]),
        Case(f"{cid}/mapped+not_eligible", why + "; a mapped frame above 4 GiB: EBUSY (mapped comes first)",
             "i686-pae", regions, boot + mapped + [Step("mm", "donate", {"frames": [[hi, 1]]}, rule="mapped")],
             setup=4, flags=["rule:donate.mapped", "later:donate.not_eligible", "precedence", "pae"]),
    ]


def all_cases() -> list[Case]:
    out: list[Case] = []
    for arch in PROFILES:
        out.extend(rule_cases(arch))
        out.extend(design_cases(arch))
    out.extend(pae_high_cases())
    return out


__all__ = ["PROFILES", "Setup", "all_cases", "breakers", "design_cases", "pae_high_cases", "rule_cases"]
