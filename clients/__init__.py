"""Clients of the kernel and the memory manager.

- ``client``: the client library (one identity, two connections: kernel and mm).
- ``workloads``: sans-I/O workload generators (steady, sparse, kobjects, sharer).
- ``runner``: the workload client process (``mmsim client run``).
- ``attacks``: lying clients (``mmsim client attack``).
"""
