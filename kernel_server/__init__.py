"""The kernel: the authoritative frame table and the system calls, as a sans-I/O core and a thin
ZeroMQ shell.

Sans-I/O (no sockets, clocks, randomness, sqlite3 or os):

- ``arch``: architecture profiles (page sizes, page-table shape, user space, kernel eligibility).
- ``bootmap``: the physical memory map the kernel boots from.
- ``frames``: the frame table: flat numpy arrays over every frame, and the kernel free list.
- ``slab``: slab caches for small kernel objects (a process's endpoints).
- ``pagetable``: a process's page-table tree (``AddressSpace``) and its shape (``Geometry``).
- ``process``: a process: its address space, kernel objects and kernel quota.
- ``calls``: the one table of calls: models, who may call, whether they change state, and the
  order in which their rules are checked (which errno wins).
- ``core``: ``KernelCore``, the system calls, each a check (a frozen plan) and a commit.
- ``service``: ``KernelService``: bytes in, bytes out; validation, replay cache, leases.
- ``invariants``: the invariants as predicates, for the full checker and incremental ones.
- ``observe``: the observer seam (calls, refusals, replay misses, every write).

The shell: ``server`` (the CURVE ROUTER loop, the clock, stall credit) and ``cli`` (``mmsim kernel``).
"""
