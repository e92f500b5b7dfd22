"""The kernel calls' reference, generated from the one call table (``kernel_server.calls``).

``docs/design.md`` carries, for every kernel call, a block between
``<!-- call NAME -->`` and ``<!-- end call -->``: who may make it, whether it
changes state, its arguments (from the call's strict pydantic model) and its
refusals in the documented order (the common checks, then the call's own
rules). The blocks are written by this module, never by hand, so the
document cannot drift from the code: ``tests/test_docs.py`` regenerates them
and compares; ``python -m kernel_server.calldoc docs/design.md`` rewrites
them in place. What each call returns is prose around the block.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from kernel_server.calls import CALLS, COMMON, KernelCall, Who

BLOCK = re.compile(r"<!-- call (?P<name>[a-z_]+) -->\n.*?<!-- end call -->", re.S)

WHO = {
    Who.ANYONE: "anyone admitted",
    Who.MM: "the memory manager",
    Who.READER: "the memory manager or the operator",
    Who.PROCESS: "a client with a process, on its own process",
    Who.MM_OR_OWN: "the memory manager (on any process, naming `pid`), or a client on its own process",
}
ENVELOPE = ("size", "envelope", "unauthenticated", "call")  # the first common checks: the same for every call
# the common checks every request goes through; only those that can apply to a call are listed with it
_COMMON_FOR = {
    "caller": lambda c: c.who in (Who.MM, Who.READER),
    "caller_process": lambda c: c.who is Who.PROCESS,
    "client_size": lambda c: c.name in ("map", "unmap"),
}


def _num(v: int | None) -> str:
    """A bound as a reader takes it in: 7, 1024, 2^40, 2^64 - 1."""
    if v is None or v < 1 << 16:
        return str(v)
    if v & (v - 1) == 0:
        return f"2^{v.bit_length() - 1}"
    if (v + 1) & v == 0:
        return f"2^{v.bit_length()} - 1"
    return str(v)


def _type(prop: dict[str, Any]) -> str:
    """A field's type and bounds, in words, from its JSON schema."""
    if "anyOf" in prop:
        options = [p for p in prop["anyOf"] if p.get("type") != "null"]
        return _type(options[0]) if len(options) == 1 else " or ".join(_type(p) for p in options)
    t = prop.get("type")
    if t == "array" and prop.get("items", {}).get("type") == "array":
        return f"frame runs `[[first, count], ...]`, 1 to {prop.get('maxItems')} runs"
    if t == "integer":
        return f"integer {_num(prop.get('minimum'))}..{_num(prop.get('maximum'))}"
    if t == "string":
        n = prop.get("maxLength")
        return f"string of {n} characters (a Z85 public key)" if n == 40 else "string"
    if t == "boolean":
        return "boolean"
    return str(t)


def _args(call: KernelCall) -> list[str]:
    schema = call.model.model_json_schema()
    props = schema.get("properties", {})
    if not props:
        return ["Arguments: none (`{}`)."]
    required = set(schema.get("required", ()))
    out = ["| argument | type | |", "| --- | --- | --- |"]
    for name, prop in props.items():
        need = "required" if name in required else f"optional, default `{prop.get('default')!r}`".replace("None", "null")
        out.append(f"| `{name}` | {_type(prop)} | {need} |")
    return out


def block(call: KernelCall) -> str:
    """The generated reference of one call (without its markers)."""
    lines = [f"Who: {WHO[call.who]}. Changes state: {'yes' if call.mutates else 'no'}.", ""]
    lines.extend(_args(call))
    lines.extend(["", "Refusals, in the order they are checked (the first broken rule is the answer):", ""])
    common = [r for r in COMMON if _COMMON_FOR.get(r.name, lambda c: True)(call)]
    envelope = [r for r in common if r.name in ENVELOPE]
    lines.append(f"1. {', '.join(f'`{r.errno.name}` ({r.name})' for r in envelope)}: the checks every request "
                 "goes through (section 5)")
    rest = [r for r in common if r.name not in ENVELOPE] + list(call.rules)
    for i, r in enumerate(rest, 2):
        lines.append(f"{i}. `{r.errno.name}` ({r.name}): {r.when}")
    return "\n".join(lines)


def render(text: str) -> str:
    """``text`` with every call block regenerated; raises KeyError naming an unknown call."""
    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in CALLS:
            raise KeyError(f"docs name a kernel call that does not exist: {name!r}")
        return f"<!-- call {name} -->\n{block(CALLS[name])}\n<!-- end call -->"
    return BLOCK.sub(one, text)


def documented(text: str) -> list[str]:
    return [m.group("name") for m in BLOCK.finditer(text)]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m kernel_server.calldoc docs/design.md", file=sys.stderr)
        return 2
    path = argv[0]
    with open(path) as f:
        old = f.read()
    new = render(old)
    missing = sorted(set(CALLS) - set(documented(new)))
    if new != old:
        with open(path, "w") as f:
            f.write(new)
    print(f"{path}: {len(documented(new))} call blocks" + (f"; undocumented calls: {', '.join(missing)}" if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
