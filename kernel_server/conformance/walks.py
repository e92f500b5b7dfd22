"""Cases drawn by the kernel's hypothesis state machine (tests/test_kernel_props.py), deterministically.

The property tests drive the kernel with valid and hostile calls next to a reference model that
predicts every reply; here the same machine runs with ``derandomize`` (a fixed seed, no example
database, no shrinking), and every call it makes is recorded as a step of a walk. Each example is
one walk: its boot map (the machine boots with 0 to 24 free kernel frames), then its calls. No time
passes in a walk (leases are not the vectors' business): the machine's rule that lets time pass is
replaced by one that only pings.

The machine lives with the tests, so walks are drawn from a source checkout (with hypothesis, a
test dependency, installed). The draws depend on hypothesis's version: ``HYPOTHESIS_VERSION`` is
recorded with the vectors, and the drift test regenerates walks byte for byte only under it.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from typing import Any

from kernel_server.conformance.cases import Case, Step

PROPS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests",
                     "test_kernel_props.py")
MACHINES = {"i686": "I686Machine", "i686-pae": "PaeMachine", "x86_64": "X86_64Machine"}


class WalkError(RuntimeError):
    pass


def hypothesis_version() -> str:
    try:
        import hypothesis
    except ImportError:
        return ""
    return hypothesis.__version__


def _props() -> Any:
    if not os.path.exists(PROPS):
        raise WalkError(f"walks are drawn by the state machine of {PROPS}, which this installation lacks: "
                        "run the export from a source checkout")
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise WalkError("walks are drawn with hypothesis, a test dependency: pip install -e '.[test]'") from None
    name = "_mmsim_kernel_props_for_vectors"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PROPS)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _roles(mod: Any) -> dict[str, str]:
    out = {mod.MM: "mm", mod.OP: "operator", mod.STRANGER: "stranger", mod.NEWKEY: f"client-{len(mod.KEYS)}"}
    for i, k in enumerate(mod.KEYS):
        out[k] = f"client-{i}"
    return out


def _no_local_constants() -> Any:
    """Hypothesis biases its draws with constants from the source of every local module imported so far, so
    the draws would depend on what else the process imported (a test suite, a command): during the walks
    it sees none. Returns the undo."""
    try:
        from hypothesis.internal.conjecture import providers as P

        real = P._get_local_constants
        empty = type(P._local_constants)()
    except (ImportError, AttributeError):  # another version: its draws are checked against its own record
        return lambda: None

    def clear() -> None:
        cache = getattr(P, "CONSTANTS_CACHE", None)
        if cache is not None and hasattr(cache, "cache"):
            cache.cache.clear()

    P._get_local_constants = lambda: empty
    clear()

    def undo() -> None:
        P._get_local_constants = real
        clear()
    return undo


def walks(arch: str, examples: int, steps: int) -> list[Case]:
    """``examples`` walks of up to ``steps`` rule applications each, on ``arch``, always the same ones
    for one version of hypothesis and of the state machine."""
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import rule, run_state_machine_as_test

    mod = _props()
    roles = _roles(mod)
    recorded: list[tuple[Any, list[Step]]] = []

    def as_args(args: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(args)
        if isinstance(out.get("key"), str) and out["key"] in roles:
            out["key"] = {"$key": roles[out["key"]]}
        return out

    class Recording(mod.KernelService):
        @classmethod
        def boot(cls, *a: Any, **kw: Any) -> Any:
            svc = super().boot(*a, **kw)
            svc._walk = []
            recorded.append((svc, svc._walk))
            return svc

        def call(self, identity: str, call: str, args: dict[str, Any] | None = None, now: float = 0.0) -> Any:
            self._walk.append(Step(roles[identity], call, as_args(args or {})))
            return super().call(identity, call, args, now)

    base = getattr(mod, MACHINES[arch])

    class Walker(base):  # type: ignore[misc, valid-type]
        @rule(key=st.sampled_from(mod.KEYS + [mod.STRANGER]))
        def time(self, key: str) -> None:
            """(replaces the machine's rule that lets time pass: a walk has no clock)"""
            out, _ = self.call(key, "ping")
            assert out == {"pid": self.pids.get(key)}

    Walker.__name__ = f"Walk_{arch.replace('-', '_')}"
    saved = mod.KernelService
    mod.KernelService = Recording
    profile = getattr(settings, "_current_profile", None)
    settings.load_profile("default")  # whatever profile a test suite loaded, the same draws
    unpatch = _no_local_constants()
    try:
        run_state_machine_as_test(Walker, settings=settings(
            max_examples=examples, stateful_step_count=steps, derandomize=True, database=None, deadline=None,
            phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck), print_blob=False))
    finally:
        mod.KernelService = saved
        unpatch()
        if profile:
            settings.load_profile(profile)
    out = []
    for i, (svc, walk) in enumerate(recorded):
        regions = [(r.kind, r.first, r.count) for r in svc.core.bootmap.regions]
        pool = sum(c for k, _f, c in regions if k == "kernel_pool")
        out.append(Case(f"walk/{arch}/{i:03d}", f"a walk of the kernel's state machine ({len(walk)} calls drawn, "
                        f"{pool} free kernel frames at boot)", arch, regions, walk, flags=["walk"], strict=False))
    return out


__all__ = ["PROPS", "WalkError", "hypothesis_version", "walks"]
