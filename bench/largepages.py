"""Anti-fragmentation figure: large pages still allocatable after a seeded churn.

The same seeded churn runs twice in one process, on the unchanged kernel and mm
cores: once with the mm's pageblock placement (broken blocks first, each
owner's frames kept together), once with plain first fit. Long-lived clients
hold small allocations; short-lived clients come, allocate, free some, and
die (the kernel destroys their process and the mm learns it from the events);
the kernel pool is kept between its watermarks throughout. Afterwards one more
client allocates large pages until it cannot.
"""

from __future__ import annotations

import random
from typing import Any

from kernel_server.service import KernelService
from mm_service.policy import Config, MMCore, drive
from protocol.calls import MM_CALLS, validate

MM = "M" * 40


def churn(placement: str, seed: int = 1, arch: str = "i686-pae", memory: int = 128 << 20,
          steps: int = 6000, fill: float = 0.7) -> dict[str, Any]:
    rng = random.Random(seed)
    kernel = KernelService.boot(arch=arch, memory=memory, mm_key=MM, kernel_pool_frames=64)
    mm = MMCore(kernel.call(MM, "address_map"), kernel.call(MM, "hello"),
                Config(low=32, target=128, high=512, quota=1 << 30, placement=placement))

    def run(gen: Any) -> Any:
        return drive(gen, lambda c, a: kernel.call(MM, c, a), lambda ops: None)

    def req(key: str, call: str, **args: Any) -> Any:
        r = run(mm.request(key, call, validate(MM_CALLS, call, args)))
        run(mm.maintain())
        return r

    run(mm.refresh())
    ram = mm.view.counts()["ram"]
    budget = int(ram * fill)
    long_budget = int(ram * 0.05)  # each of the 3 long-lived clients holds up to this
    serial = 0

    def new_client(life: int) -> dict[str, Any]:
        nonlocal serial
        serial += 1
        return {"key": f"{serial:040d}", "live": [], "until": step + life}

    step = 0
    long_lived = [new_client(10 ** 9) for _ in range(3)]
    short: list[dict[str, Any]] = []
    used = 0
    for step in range(steps):
        if rng.random() < 0.05:
            short.append(new_client(rng.randrange(50, 400)))
        for c in [c for c in short if c["until"] <= step]:  # a short-lived client dies
            short.remove(c)
            st = mm.view.clients.get(c["key"])
            if st is not None:
                kernel.call(MM, "proc_destroy", {"pid": st.pid})
                run(mm.poll_events())
            used -= sum(p for _, p in c["live"])
        c = rng.choice(long_lived) if not short or rng.random() < 0.15 else rng.choice(short)
        held = sum(p for _, p in c["live"])
        full = used > budget or (c in long_lived and held > long_budget)
        if c["live"] and (full or rng.random() < 0.4):
            vaddr, pages = c["live"].pop(rng.randrange(len(c["live"])))
            req(c["key"], "free", vaddr=vaddr, pages=pages)
            used -= pages
        elif not full:
            pages = rng.choice((1, 1, 1, 2, 3, 4, 8, 16, 33))
            sparse = {}
            if c in long_lived:  # long-lived clients map sparsely: each region costs the kernel a page table
                c["next"] = c.get("next", 0x1000_0000) + 0x40_0000
                sparse = {"vaddr": c["next"]}
            r = req(c["key"], "alloc", pages=pages, prot=3, **sparse)
            if isinstance(r, dict):
                c["live"].append((r["vaddr"], pages))
                used += pages
    for c in short:  # the rest of the short-lived clients end too
        st = mm.view.clients.get(c["key"])
        if st is not None:
            kernel.call(MM, "proc_destroy", {"pid": st.pid})
    run(mm.poll_events())
    block = mm.view.block
    free = mm.view.counts()["free"]
    large = 0
    while isinstance(req("Z" * 40, "alloc", pages=block, prot=3, large=True), dict):
        large += 1
    return {"placement": placement, "large_pages": large, "block_frames": block, "free_frames": free,
            "possible": free // block, "seed": seed, "steps": steps}


def compare(seed: int = 1, steps: int = 6000) -> dict[str, Any]:
    a = churn("pageblock", seed, steps=steps)
    b = churn("first-fit", seed, steps=steps)
    return {"pageblock": a, "first_fit": b,
            "ratio": (a["large_pages"] / b["large_pages"]) if b["large_pages"] else float("inf")}


if __name__ == "__main__":
    import json
    print(json.dumps(compare(), indent=2))
