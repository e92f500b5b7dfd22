"""docker-compose.yml and the Dockerfile, checked without a container engine: every service runs
a real ``mmsim`` command whose options the CLI itself accepts (its health check too), the services
reach each other by name over tcp on the ports the servers bind, each client replica admits a
distinct name and runs with a distinct seed (its shell line is run here with a stand-in ``mmsim``),
and the image installs the project."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess

import pytest
import typer
import yaml
from typer.testing import CliRunner

from clients.workloads import WORKLOADS
from kernel_server.arch import PROFILES
from mmsim.cli import app
from protocol import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "/run/mmsim"


@pytest.fixture(scope="module")
def compose() -> dict:
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> str:
    """The shared volume as the ``keys`` service leaves it (the run directory with the servers' keys):
    RUN in the commands stands for it, so the CLI's checks of the run directory see a real one."""
    d = str(tmp_path_factory.mktemp("volume"))
    rundir.init(d, clients=0)
    return d


def unescape(s: str) -> str:
    """What compose passes to the container: ``$$`` is its escape for ``$``."""
    return s.replace("$$", "$")


def parse(argv: list[str], volume: str | None = None) -> tuple[list[str], dict]:
    """Parse ``mmsim ARGS`` with the real command tree: (command path, parsed options). An unknown
    command or a bad or missing option raises typer's usage errors (``typer.TyperException``).
    With ``volume``, RUN in the arguments stands for that directory (the parsed options name RUN)."""
    assert argv[0] == "mmsim", f"not an mmsim command: {argv}"
    args = [unescape(a) for a in argv[1:]]
    if volume is not None:
        args = [volume + a[len(RUN):] if a == RUN or a.startswith(RUN + "/") else a for a in args]
    cmd = typer.main.get_command(app)
    path: list[str] = []
    while hasattr(cmd, "list_commands"):  # a group: the next word names a command
        if not args or args[0].startswith("-"):
            raise typer.BadParameter(f"mmsim {' '.join(path)} needs a command")
        name = args.pop(0)
        sub = cmd.get_command(typer.Context(cmd, info_name=name), name)
        if sub is None:
            raise typer.BadParameter(f"no such command {' '.join(['mmsim', *path, name])!r}")
        path.append(name)
        cmd = sub
    ctx = cmd.make_context(" ".join(["mmsim", *path]), list(args), resilient_parsing=False)
    params = {k: (RUN + v[len(volume):] if volume and isinstance(v, str) and v.startswith(volume) else v)
              for k, v in ctx.params.items()}
    return path, params


def shell_run(script: str, hostname: str, tmp: str) -> list[list[str]]:
    """Run a service's ``sh -c`` line as its container would (HOSTNAME set by the engine), with a
    stand-in ``mmsim`` on PATH that records its arguments; the argument lists, in order."""
    bindir = os.path.join(tmp, f"bin-{hostname}")
    os.makedirs(bindir, exist_ok=True)
    log = os.path.join(tmp, f"calls-{hostname}.jsonl")
    fake = os.path.join(bindir, "mmsim")
    with open(fake, "w") as f:
        f.write("#!/usr/bin/env python3\nimport json, sys\n"
                f"open({log!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    os.chmod(fake, os.stat(fake).st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "HOSTNAME": hostname}
    r = subprocess.run(["sh", "-c", unescape(script)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    with open(log) as f:
        return [["mmsim", *json.loads(line)] for line in f]


def mmsim_commands(svc: dict, tmp: str, hostname: str = "c0ffee123456") -> list[list[str]]:
    """The mmsim command lines a service runs: its exec-form command, or what its shell line runs."""
    cmd = svc["command"]
    assert isinstance(cmd, list), "command must be an exec-form list"
    if cmd[:2] == ["sh", "-c"]:
        assert len(cmd) == 3
        return shell_run(cmd[2], hostname, tmp)
    return [cmd]


def test_the_parser_rejects_what_mmsim_rejects(volume):
    for bad in (["mmsim", "no-such-command"], ["mmsim", "client"], ["mmsim", "kernel", "--no-such-option", "1"],
                ["mmsim", "kernel", "--lease", "soon"], ["mmsim", "kernel", "--lease", "0"],
                ["mmsim", "client", "run", "--workload", "steady"],  # lacks --run-dir
                ["mmsim", "ping", "router", "--run-dir", RUN], ["mmsim", "keys", "admit", RUN],  # lacks NAME
                ["mmsim", "audit", "--run-dir", "/nonexistent/run"]):
        with pytest.raises(typer.TyperException):
            parse(bad, volume)
    path, params = parse(["mmsim", "audit", "--run-dir", RUN, "--mm", "tcp://mm:5556"], volume)
    assert path == ["audit"] and params["run_dir"] == RUN and params["endpoint"] == "tcp://mm:5556"


def test_every_service_command_is_a_real_mmsim_command(compose, volume, tmp_path):
    services = compose["services"]
    assert {"keys", "kernel", "mm", "client"} <= set(services)
    seen = {}
    for name, svc in services.items():
        for argv in mmsim_commands(svc, str(tmp_path)):
            path, params = parse(argv, volume)
            seen.setdefault(name, []).append((path, params))
            if "run_dir" in params:
                assert params["run_dir"] == RUN, name
            if params.get("arch") is not None:
                assert params["arch"].value in PROFILES, name
            if params.get("workload") is not None:
                assert params["workload"] in WORKLOADS, name
    assert seen["keys"][0][0] == ["keys", "init"] and seen["keys"][0][1]["run_dir"] == RUN
    assert seen["kernel"][0][0] == ["kernel"] and seen["mm"][0][0] == ["mm"]
    assert [p for p, _ in seen["client"]] == [["keys", "admit"], ["client", "run"]]


def test_health_checks_ping_their_own_server_and_gate_the_start(compose, volume):
    services = compose["services"]
    for name in ("kernel", "mm"):
        hc = services[name]["healthcheck"]
        assert hc["test"][0] == "CMD", name
        path, params = parse(hc["test"][1:], volume)
        assert path == ["ping"] and params["server"].value == name and params["run_dir"] == RUN
        assert params["endpoint"] is None  # its own endpoint file: right inside its own container
        assert float(hc["timeout"].rstrip("s")) > params["timeout"], name
    assert services["kernel"]["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    assert services["mm"]["depends_on"]["kernel"]["condition"] == "service_healthy"
    assert services["client"]["depends_on"]["mm"]["condition"] == "service_healthy"
    assert services["mm"]["restart"] == "on-failure"


def test_each_client_replica_admits_itself_and_runs_with_its_own_name_and_seed(compose, volume, tmp_path):
    svc = compose["services"]["client"]
    runs = {}
    for host in ("0a1b2c3d4e5f", "9f8e7d6c5b4a"):
        (admit_argv, run_argv) = mmsim_commands(svc, str(tmp_path), host)
        _, admit = parse(admit_argv, volume)
        _, run = parse(run_argv, volume)
        assert admit["name"] == run["name"] == f"client-{host}"
        assert admit["quota"] is not None
        runs[host] = run
        # the admission step does what the operator's `mmsim keys admit` does, in the shared volume
        real = [volume if a == RUN else a for a in admit_argv[1:]]
        r = CliRunner().invoke(app, real)
        assert r.exit_code == 0, r.stderr
        grants = {g.name: g for g in rundir.admitted(volume).values()}
        assert grants[f"client-{host}"].quota == admit["quota"]
        assert grants[f"client-{host}"].key == rundir.public_key(volume, f"client-{host}").decode()
    a, b = runs.values()
    assert a["name"] != b["name"] and a["seed"] != b["seed"]


def test_services_reach_each_other_by_name_over_tcp(compose, volume, tmp_path):
    services = compose["services"]
    _, kernel = parse(services["kernel"]["command"], volume)
    _, mm = parse(services["mm"]["command"], volume)
    kport = re.fullmatch(r"tcp://0\.0\.0\.0:(\d+)", kernel["bind"]).group(1)
    mport = re.fullmatch(r"tcp://0\.0\.0\.0:(\d+)", mm["bind"]).group(1)
    assert mm["kernel"] == f"tcp://kernel:{kport}"
    assert str(kport) in [str(p) for p in services["kernel"].get("expose", [])]
    assert str(mport) in [str(p) for p in services["mm"].get("expose", [])]
    for name, svc in services.items():
        for argv in mmsim_commands(svc, str(tmp_path)):
            path, params = parse(argv, volume)
            if params.get("kernel") is not None and name != "mm":
                assert params["kernel"] == f"tcp://kernel:{kport}", name
            if name not in ("mm", "kernel", "keys") and "mm" in svc.get("depends_on", {}) and path != ["keys", "admit"]:
                ep = params.get("mm") if "mm" in params else params.get("endpoint")
                assert ep == f"tcp://mm:{mport}", name


def test_start_order_and_the_shared_run_directory(compose):
    services = compose["services"]
    assert "kernel" in services["mm"]["depends_on"]
    assert "mm" in services["client"]["depends_on"]
    volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        mounts = svc.get("volumes", [])
        assert any(m.split(":")[1] == RUN and m.split(":")[0] in volumes for m in mounts), name
        assert svc.get("build") or svc.get("image"), name
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_the_dockerfile_installs_the_project():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11")
    assert any(ln.startswith("COPY . ") for ln in lines)
    assert re.search(r"pip install [^\n]*/opt/mmsim", text), "the image must pip-install the project"
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = f.read().split()
    assert "*.key_secret" in ignored and ".git" in ignored  # no keys or history in the image
