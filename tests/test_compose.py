"""docker-compose.yml and the Dockerfile, checked without a container engine: every service runs
a real ``mmsim`` command whose options the CLI itself accepts, the services reach each other by
name over tcp on the ports the servers bind, and the image installs the project."""

from __future__ import annotations

import os
import re

import pytest
import typer
import yaml

from mmsim.cli import app
from clients.workloads import WORKLOADS
from kernel_server.arch import PROFILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "/run/mmsim"


@pytest.fixture(scope="module")
def compose() -> dict:
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        return yaml.safe_load(f)


def parse(argv: list[str]) -> tuple[list[str], dict]:
    """Parse ``mmsim ARGS`` with the real command tree: (command path, parsed options). An unknown
    command or a bad or missing option raises typer's usage errors (``typer.TyperException``)."""
    assert argv[0] == "mmsim", f"not an mmsim command: {argv}"
    cmd = typer.main.get_command(app)
    args, path = list(argv[1:]), []
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
    return path, ctx.params


def test_the_parser_rejects_what_mmsim_rejects():
    for bad in (["mmsim", "no-such-command"], ["mmsim", "client"], ["mmsim", "kernel", "--no-such-option", "1"],
                ["mmsim", "kernel", "--lease", "soon"], ["mmsim", "kernel", "--lease", "0"],
                ["mmsim", "client", "run", "--workload", "steady"]):  # the last lacks --run-dir
        with pytest.raises(typer.TyperException):
            parse(bad)
    path, params = parse(["mmsim", "audit", "--run-dir", RUN, "--mm", "tcp://mm:5556"])
    assert path == ["audit"] and params["run_dir"] == RUN and params["endpoint"] == "tcp://mm:5556"


def test_every_service_command_is_a_real_mmsim_command(compose):
    services = compose["services"]
    assert {"keys", "kernel", "mm", "client"} <= set(services)
    seen = {}
    for name, svc in services.items():
        cmd = svc["command"]
        assert isinstance(cmd, list), f"{name}: command must be an exec-form list"
        path, params = parse(cmd)
        seen[name] = (path, params)
        if "run_dir" in params:
            assert params["run_dir"] == RUN, name
        if params.get("arch") is not None:
            assert params["arch"] in PROFILES, name
        if params.get("workload") is not None:
            assert params["workload"] in WORKLOADS, name
    assert seen["keys"][0] == ["keys", "init"] and seen["keys"][1]["run_dir"] == RUN
    assert seen["kernel"][0] == ["kernel"] and seen["mm"][0] == ["mm"]
    assert seen["client"][0] == ["client", "run"]


def test_services_reach_each_other_by_name_over_tcp(compose):
    services = compose["services"]
    _, kernel = parse(services["kernel"]["command"])
    _, mm = parse(services["mm"]["command"])
    kport = re.fullmatch(r"tcp://0\.0\.0\.0:(\d+)", kernel["bind"]).group(1)
    mport = re.fullmatch(r"tcp://0\.0\.0\.0:(\d+)", mm["bind"]).group(1)
    assert mm["kernel"] == f"tcp://kernel:{kport}"
    assert str(kport) in [str(p) for p in services["kernel"].get("expose", [])]
    assert str(mport) in [str(p) for p in services["mm"].get("expose", [])]
    for name, svc in services.items():
        _, params = parse(svc["command"])
        if params.get("kernel") is not None and name != "mm":
            assert params["kernel"] == f"tcp://kernel:{kport}", name
        if name not in ("mm", "kernel", "keys") and "mm" in svc.get("depends_on", {}):
            ep = params.get("mm") if "mm" in params else params.get("endpoint")
            assert ep == f"tcp://mm:{mport}", name
    _, client = parse(services["client"]["command"])
    assert client["name"] is None, "replicas of a scaled service need distinct names: leave --name out"


def test_start_order_and_the_shared_run_directory(compose):
    services = compose["services"]
    assert services["kernel"]["depends_on"]["keys"]["condition"] == "service_completed_successfully"
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
