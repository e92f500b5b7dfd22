"""Writing the vectors: one file per profile (``<profile>.json``), ``schema.json`` and ``README.md``.

Deterministic: keys sorted, no timestamps, the same bytes on every run (walks: for one version of
hypothesis, recorded in every file). Each test is one line, so a change reads as a diff.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Callable

from kernel_server.conformance import normal
from kernel_server.conformance.cases import Case, CaseError, Recorded, record
from kernel_server.conformance.digest import COUNTS, PROC_FIELDS, STATE
from kernel_server.conformance.scenarios import PROFILES, all_cases
from protocol.errors import Errno

FORMAT = 1
WALK_EXAMPLES = 30  # walks per profile
WALK_STEPS = 40  # rule applications per walk, at most
FILES = tuple(f"{p}.json" for p in PROFILES) + ("schema.json", "README.md")


def collect(walk_examples: int = WALK_EXAMPLES, walk_steps: int = WALK_STEPS,
            step: Callable[[str], None] = lambda s: None) -> tuple[list[Recorded], dict[str, int]]:
    """Every case recorded (scenarios first, then walks); and counts of what was left out."""
    from kernel_server.conformance.walks import walks

    out: list[Recorded] = []
    left = {"pairs_not_breaking_the_earlier_rule": 0, "walk_steps_dropped": 0, "walks_ended_early": 0}
    step("scenarios: every rule of every call, rule pairs, the design's scenarios")
    for case in all_cases():
        try:
            out.append(record(case))
        except CaseError:
            if not case.optional:
                raise
            left["pairs_not_breaking_the_earlier_rule"] += 1
    for arch in PROFILES:
        step(f"walks of the state machine on {arch}")
        for case in walks(arch, walk_examples, walk_steps):
            rec = record(case)
            left["walk_steps_dropped"] += rec.dropped
            left["walks_ended_early"] += bool(rec.ended)
            if rec.steps:
                out.append(rec)
    return out, left


def _test(tc: int, rec: Recorded) -> dict[str, Any]:
    c = rec.case
    return {
        "tcId": tc,
        "id": c.id,
        "comment": c.comment,
        "flags": sorted(c.flags),
        "bootMap": {"arch": c.arch, "regions": [list(r) for r in c.regions]},
        "initialDigest": rec.initial,
        "setup": min(c.setup, len(rec.steps)),
        "steps": [{"as": s.role, "call": s.call, "args": s.args, "expect": exp, "digest": d}
                  for s, exp, d in rec.steps],
    }


def group_of(case: Case) -> str:
    return case.id.split("/")[0]


def build(recs: list[Recorded], hypothesis: str) -> dict[str, dict[str, Any]]:
    """The file contents, by profile."""
    by: dict[str, dict[str, list[Recorded]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        by[r.case.arch][group_of(r.case)].append(r)
    files = {}
    for arch in PROFILES:
        groups = []
        tc = 0
        for name in sorted(by[arch], key=lambda g: (g == "walk", g)):
            tests = []
            for r in by[arch][name]:
                tc += 1
                tests.append(_test(tc, r))
            source = "walk" if name == "walk" else ("rules" if name in _CALL_NAMES else "design")
            groups.append({"group": name, "profile": arch, "source": source, "tests": tests})
        files[arch] = {"format": FORMAT, "profile": arch, "schema": "schema.json", "generator": {
            "command": "mmsim vectors export tests/vectors", "hypothesis": hypothesis,
            "walks": {"examples": WALK_EXAMPLES, "steps": WALK_STEPS}},
            "numberOfTests": tc, "testGroups": groups}
    return files


def _calls() -> frozenset[str]:
    from kernel_server.calls import CALLS

    return frozenset(CALLS) | {"nope"}


_CALL_NAMES = _calls()


def dumps(doc: dict[str, Any]) -> str:
    """JSON with sorted keys; each test on a line of its own."""
    def c(v: Any) -> str:
        return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    head = {k: v for k, v in doc.items() if k != "testGroups"}
    lines = ["{"]
    for k in sorted(head):
        lines.append(f"{c(k)}:{c(head[k])},")
    lines.append('"testGroups":[')
    for gi, g in enumerate(doc["testGroups"]):
        gh = {k: v for k, v in g.items() if k != "tests"}
        lines.append("{" + ",".join(f"{c(k)}:{c(gh[k])}" for k in sorted(gh)) + ',"tests":[')
        tests = g["tests"]
        for ti, t in enumerate(tests):
            lines.append(c(t) + ("," if ti < len(tests) - 1 else ""))
        lines.append("]}" + ("," if gi < len(doc["testGroups"]) - 1 else ""))
    lines.append("]}")
    return "\n".join(lines) + "\n"


def export(out_dir: str, walk_examples: int = WALK_EXAMPLES, walk_steps: int = WALK_STEPS,
           step: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Write the vectors into ``out_dir``; a summary (groups, tests, bytes per file, what was left out)."""
    from kernel_server.conformance.walks import hypothesis_version

    recs, left = collect(walk_examples, walk_steps, step)
    files = build(recs, hypothesis_version())
    os.makedirs(out_dir, exist_ok=True)
    sizes = {}
    for arch, doc in files.items():
        sizes[f"{arch}.json"] = _write(out_dir, f"{arch}.json", dumps(doc))
    sizes["schema.json"] = _write(out_dir, "schema.json", json.dumps(schema(), sort_keys=True, indent=1) + "\n")
    sizes["README.md"] = _write(out_dir, "README.md", README)
    return {"dir": out_dir, "groups": sum(len(d["testGroups"]) for d in files.values()),
            "tests": sum(d["numberOfTests"] for d in files.values()),
            "steps": sum(len(t["steps"]) for d in files.values() for g in d["testGroups"] for t in g["tests"]),
            "bytes": sizes, "left_out": left}


def _write(d: str, name: str, text: str) -> int:
    data = text.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    return len(data)


# ---- the schema -----------------------------------------------------------------------------------

def schema() -> dict[str, Any]:
    expect = {
        "oneOf": [
            {"type": "object", "required": ["ok", "result"], "additionalProperties": False,
             "properties": {"ok": {"const": True}, "result": {"type": "object"}}},
            {"type": "object", "required": ["ok", "error", "details"], "additionalProperties": False,
             "properties": {"ok": {"const": False}, "error": {"enum": [e.name for e in Errno]},
                            "details": {"type": "object"}}},
        ]}
    step = {"type": "object", "required": ["as", "call", "args", "expect", "digest"], "additionalProperties": False,
            "properties": {
                "as": {"type": "string", "pattern": "^(mm|operator|stranger|client-[0-9]+)$",
                       "description": "the caller's role"},
                "call": {"type": "string"},
                "args": {"type": "object", "description": "the request's args; {\"$key\": ROLE} is that role's "
                         "public key; an element {\"$free\": N} / {\"$used\": N} of a list of runs is the runs of "
                         "the N lowest-numbered free / in-use kernel frames (0: all), read from the kernel just "
                         "before the step"},
                "expect": expect,
                "digest": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$",
                           "description": "the state digest after the step; null when the design leaves the "
                           "frames' owners to the implementation (the case's last step)"}}}
    test = {"type": "object", "additionalProperties": False,
            "required": ["tcId", "id", "comment", "flags", "bootMap", "initialDigest", "setup", "steps"],
            "properties": {
                "tcId": {"type": "integer", "minimum": 1}, "id": {"type": "string"}, "comment": {"type": "string"},
                "flags": {"type": "array", "items": {"type": "string"}},
                "bootMap": {"type": "object", "required": ["arch", "regions"], "additionalProperties": False,
                            "properties": {"arch": {"enum": list(PROFILES)}, "regions": {
                                "type": "array", "items": {"type": "array", "prefixItems": [
                                    {"enum": ["reserved", "kernel_image", "frame_table", "kernel_pool", "ramdisk",
                                              "firmware", "user"]},
                                    {"type": "integer", "minimum": 0}, {"type": "integer", "minimum": 1}],
                                    "items": False}}}},
                "initialDigest": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "setup": {"type": "integer", "minimum": 0,
                          "description": "leading steps that only build the state the test is about"},
                "steps": {"type": "array", "minItems": 1, "items": step}}}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "mmsim kernel test vectors",
        "type": "object",
        "required": ["format", "profile", "schema", "generator", "numberOfTests", "testGroups"],
        "properties": {
            "format": {"const": FORMAT}, "profile": {"enum": list(PROFILES)}, "schema": {"type": "string"},
            "generator": {"type": "object"}, "numberOfTests": {"type": "integer"},
            "testGroups": {"type": "array", "items": {
                "type": "object", "required": ["group", "profile", "source", "tests"],
                "properties": {"group": {"type": "string", "description": "the call under test (source rules), "
                                         "a scenario of the design, or walk"},
                               "profile": {"enum": list(PROFILES)},
                               "source": {"enum": ["rules", "design", "walk"]},
                               "tests": {"type": "array", "items": test}}}}},
        "x-running": [
            "Boot a fresh kernel from bootMap (its regions, by frame number; what each kind means at boot is the "
            "table in the README); check initialDigest; then send each step's call as its role and compare the "
            "reply with expect and the state with digest. A test passes when every step does.",
            "Steps are sent in order, one at a time; no time passes (no lease runs out).",
        ],
        "x-roles": {
            "mm": "the memory manager: the key the kernel is told at boot",
            "operator": "always admitted; reads what the mm reads, changes nothing",
            "client-N": "an admitted client key; it has a process once the mm creates one for it",
            "stranger": "an admitted client key that never has a process (not an unadmitted key)",
        },
        "x-expect": {
            "ok": "success: result holds the normative fields of the reply, exactly (see x-result-fields)",
            "error": "refusal: the errno name (numbers in x-errno); details holds every detail of the error but the "
                     "message; EINVAL's field is the top-level argument it names. Messages are never compared",
            "keys": "a key in a reply (hello's identity, the listing's and the events' key) is written as its role",
        },
        "x-result-fields": {call: list(f) for call, f in normal.RESULT_FIELDS.items()},
        "x-not-normative": [
            "error messages", "the service's counters (calls, refused, replayed, replies_dropped)",
            "hello's lease_seconds and boot_id",
            "which free kernel frames back the kernel's objects, and which a reclaim {count} takes (its "
            "`frames`); so also the free/in-use state of those frames (steps whose reply depends on it are not "
            "in the vectors)",
        ],
        "x-ids": "pids, tids and eids come from one kernel-wide counter each, from 1, one per object created, "
                 "never reused; event sequence numbers likewise. A replayer running several tests on one kernel "
                 "adds to each id (pid, from_pid, next_pid, tid, eid, since, seq, next, latest, event_seq) the "
                 "last one the kernel gave before the test (events' since defaults to 0: make it explicit first)",
        "x-errno": {e.name: int(e) for e in Errno},
        "x-digest": {
            "algorithm": "SHA-256 over the bytes below, lowercase hex; every integer little-endian",
            "layout": [
                "the 14 ASCII bytes 'mmsim-state-1' and a newline",
                "u32 frames (the frame table's span), u32 processes",
                "7 x u64: " + ", ".join(COUNTS),
                "for each frame from 0: u8 state, u32 reference count",
                "for each process by ascending pid: u64 pid, u8 length + ASCII role of its key, 7 x u64: "
                + ", ".join(PROC_FIELDS) + ", number of mapping records; then the records ascending by "
                "(vaddr, first frame, page size, prot, made_by): u64 vaddr, u64 frame, u64 page size in bytes, "
                "u8 prot, u8 made_by",
            ],
            "state": {name: code for name, code in STATE.items()},
            "state_note": "kernel_free and kernel_used are one state (1): which free frame the kernel allocates "
                          "is its own choice; their counts are in the header",
            "records": "one per mapped 4 KiB page and one per large page; made_by 0: the mm, 1: the client "
                       "itself (its read-only maps of kernel-shared frames)",
            "from_the_wire": "stats {from_pid: 0} as the operator gives the counts (and kernel_reserved) and "
                             "the per-process fields; frame_info over all frames the state and reference "
                             "counts; mappings over each process's user space its records (a segment of n 4 KiB "
                             "pages is n records)",
        },
    }


README = """# Kernel test vectors

Executable specification of the kernel's calls, for anyone implementing this
design: each test boots a machine from its boot map, sends calls as a role
(`mm`, `operator`, `client-N`, `stranger`) and gives, per step, the expected
reply (success and its normative fields, or the errno and its details) and a
SHA-256 digest of the kernel's state. `schema.json` defines the files, what is
normative, and the digest's byte layout.

| file | what |
| --- | --- |
| `i686.json`, `i686-pae.json`, `x86_64.json` | the tests of one profile, in groups: one per call (`rules`: the valid request, every refusal rule alone and rules in pairs, in the documented order), the design's scenarios (`design`), and walks of the kernel's hypothesis state machine (`walk`) |
| `schema.json` | JSON Schema of the files, and (`x-*`) roles, normative fields, ids, the digest |

Boot map kinds, by frame: `reserved` is not RAM; `kernel_image`, `ramdisk`,
`firmware` are kernel-owned, in use and mappable read-only by users
(kernel-shared); `frame_table` is kernel-owned and in use; `kernel_pool` is
kernel-owned and free; `user` is user-owned and free. Frames in no region are
holes.

Run them: `mmsim vectors run tests/vectors --in-process` (the model's core),
`mmsim vectors run tests/vectors --spawn` (a kernel process per boot map), or
`mmsim vectors run tests/vectors --kernel ENDPOINT --run-dir RUN` (a running
kernel; the tests whose boot map it was started with: `mmsim kernel --boot-map
FILE`). Regenerate with `mmsim vectors export tests/vectors` (a test checks
that the copy in the repository is what the exporter writes).
"""

__all__ = ["FILES", "build", "collect", "dumps", "export", "schema"]
