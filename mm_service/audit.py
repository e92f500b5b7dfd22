"""``audit``: compare the mm's view with the kernel's, frame by frame (I8).

A library call for tests and the ``mmsim audit`` command: it asks the running
mm (as the operator, with the mm's own key from the run directory) to read
the kernel's frame table and compare it with its view.
"""

from __future__ import annotations

from typing import Any

from protocol import rundir
from protocol.connection import Connection


def run_audit(run_dir: str, endpoint: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """The audit report; raises CallError if the mm cannot be reached or refuses (EIO when nothing
    answers within ``timeout`` seconds: one attempt, since a resend would only queue behind the first)."""
    pub, sec = rundir.load_keypair(run_dir, "mm")
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
    return "\n".join(lines)
