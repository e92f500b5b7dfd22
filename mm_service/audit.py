"""``audit``: compare the mm's view with the kernel's, frame by frame (I8), and check the charges (I13).

A library call for tests and the ``mmsim audit`` command: it asks the running
mm, as the operator (the ``operator`` key pair of the run directory), to read
the kernel's frame table and per-process listing and compare them with its
view: every frame's owner and reference count, every client charged for the
pages it maps, the charges adding up to the reference counts, and each
client's quotas at the kernel what the mm granted.
"""

from __future__ import annotations

from typing import Any

from protocol import rundir
from protocol.connection import Connection


def run_audit(run_dir: str, endpoint: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """The audit report; raises CallError if the mm cannot be reached or refuses (EIO when nothing
    answers within ``timeout`` seconds: one attempt, since a resend would only queue behind the first)."""
    pub, sec = rundir.load_keypair(run_dir, "operator")
    mm_pub = rundir.public_key(run_dir, "mm")
    with Connection(endpoint or rundir.read_endpoint(run_dir, "mm"), mm_pub, pub, sec, timeout=timeout, retries=0) as conn:
        return conn.call("audit")


def format_report(report: dict[str, Any]) -> str:
    mv, kv = report["mm_view"], report["kernel_view"]
    lines = [
        f"frames         {'mm view':>12} {'kernel view':>12}",
        f"kernel-owned   {mv['kernel']:>12} {kv['kernel']:>12}",
        f"user free      {mv['free']:>12} {kv['user_free']:>12}",
        f"user mapped    {mv['used']:>12} {kv['user_mapped']:>12}",
        f"not RAM        {'':>12} {kv['none']:>12}",
        f"pending intents: {report['pending']}",
        f"divergences: {report['divergences']}",
    ]
    for name, runs in report.get("classes", {}).items():
        lines.append(f"  {name}: {report['class_counts'][name]} frame(s), first runs {runs[:4]}")
    i13 = report.get("i13")
    if i13 is not None:
        lines.append(f"charges: {len(i13['clients'])} client(s) charged {i13['charged']} pages; references: view "
                     f"{i13['view_refs']}, kernel {i13['kernel_refs']}; granted {i13['granted_user']} pages + "
                     f"{i13['granted_kernel']} kernel frames of a budget of {i13['budget']}")
        lines.append(f"charge problems: {len(i13['problems'])}")
        lines.extend(f"  {p}" for p in i13["problems"][:20])
    rep = report.get("repaired")
    if rep and any(rep.values()):
        lines.append(f"repaired by recovery since the mm started: {rep}")
    return "\n".join(lines)
