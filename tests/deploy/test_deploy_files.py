"""What can be checked of the deployment files without a Docker engine or systemd: they parse, and every
command they name is one of the project's console scripts."""
import ast
import configparser
import importlib
import inspect
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SYSTEMD = ROOT / "systemd"


def setup_py_call() -> dict:
    tree = ast.parse((ROOT / "setup.py").read_text())
    assignments = {node.targets[0].id: node.value for node in tree.body
                   if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    call = next(node.value for node in tree.body if isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "setup")
    keywords = {}
    for kw in call.keywords:
        value = kw.value
        if isinstance(value, ast.Name):
            value = assignments[value.id]
        try:
            keywords[kw.arg] = ast.literal_eval(value)
        except ValueError:
            keywords[kw.arg] = value
    return keywords


def console_scripts() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    scripts = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                   and node.targets[0].id == "SERVICE_SCRIPTS")
    return {entry.split("=")[0].strip() for entry in ast.literal_eval(scripts)}


def console_script_entries() -> list[tuple[str, str, str]]:
    """(script, module, function) of every console script setup.py declares."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    scripts = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                   and node.targets[0].id == "SERVICE_SCRIPTS")
    entries = []
    for entry in ast.literal_eval(scripts):
        name, target = (part.strip() for part in entry.split("="))
        module, func = target.split(":")
        entries.append((name, module, func))
    return entries


@pytest.mark.parametrize("name,module,func", console_script_entries(), ids=lambda v: str(v))
def test_every_console_script_target_imports_and_is_callable(name, module, func):
    target = getattr(importlib.import_module(module), func, None)
    assert target is not None, f"{name}: {module} has no {func}"
    assert callable(target), f"{name}: {module}.{func} is not callable"
    assert Path(inspect.getfile(importlib.import_module(module))).resolve().is_relative_to(ROOT), \
        f"{name}: {module} is not imported from this checkout"


def test_every_service_script_runs_as_python_dash_m_of_its_package():
    """STYLE.md: every service package has a __main__.py, so `python -m <package>` is its console script."""
    for name, module, func in console_script_entries():
        package = module.split(".")[0]
        if package == "std_udp_recv" and name == "std_udp_sim":
            continue  # the simulator lives in the receiver's package, which has one __main__
        main = ROOT / package / "__main__.py"
        assert main.is_file(), f"{package} has no __main__.py"
        result = subprocess.run([sys.executable, "-m", package, "--help"], capture_output=True, text=True,
                                timeout=60, cwd=ROOT)
        assert result.returncode == 0, f"python -m {package} --help: {result.stderr[-2000:]}"
        assert "usage:" in result.stdout.lower()


def test_compose_file_parses_and_runs_only_project_commands():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    scripts = console_scripts()
    services = compose["services"]
    assert "rabbitmq" in services
    commands = {name: svc["command"] for name, svc in services.items() if "command" in svc}
    assert commands, "no std-daq service in the compose file"
    for name, command in commands.items():
        assert command[0] in scripts, f"{name} runs {command[0]}, not a console script of setup.py"
        assert services[name]["network_mode"] == "host"
        assert services[name]["ipc"] == "host"
        assert "./detector.json:/etc/std-daq/detector.json:ro" in services[name]["volumes"]


def test_compose_runs_one_receiver_per_module_of_its_config():
    from core_buffer import load_config

    config = load_config(DOCKER / "detector.json")
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    modules = sorted(int(svc["command"][2]) for svc in compose["services"].values()
                     if svc.get("command", [""])[0] == "std_udp_recv")
    assert modules == list(range(config.n_modules))
    assert config.ipc_dir == "/run/std-daq"


def test_all_services_run_as_one_user_the_images_by_default_who_owns_the_ipc_dir():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = [svc for svc in compose["services"].values() if "command" in svc]
    users = {svc.get("user") for svc in services}
    assert len(users) == 1 and None not in users, f"the services run as different users: {users}"
    user = users.pop()
    uid = re.fullmatch(r"\$\{(\w+):-(\d+)\}:\$\{(\w+):-(\d+)\}", user)
    assert uid, user
    base = (DOCKER / "std-daq-service-base" / "Dockerfile").read_text()
    assert f"--uid {uid.group(2)} " in base and f"--gid {uid.group(4)} " in base  # the image's std-daq user
    ipc_options = compose["volumes"]["std-daq-ipc"]["driver_opts"]["o"]
    assert f"uid=${{{uid.group(1)}:-{uid.group(2)}}}" in ipc_options
    assert f"gid=${{{uid.group(3)}:-{uid.group(4)}}}" in ipc_options


def test_the_writer_writes_into_an_existing_bind_mounted_data_dir():
    from core_buffer import load_config

    config = load_config(DOCKER / "detector.json")
    writer = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]["std-h5-writer"]
    binds = [v for v in writer["volumes"] if isinstance(v, dict) and v["type"] == "bind"]
    assert [b["target"] for b in binds] == list(config.output_dirs)
    # Docker would otherwise create a missing source as a root-owned directory the writer cannot write to.
    assert all(b["bind"]["create_host_path"] is False for b in binds)


def test_compose_stops_the_receivers_first_and_the_writer_last():
    services = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]

    def needs(name: str, other: str) -> bool:  # compose starts `other` first and stops it after `name`
        todo = list(services[name].get("depends_on", []))
        while todo:
            dep = todo.pop()
            if dep == other:
                return True
            todo.extend(services[dep].get("depends_on", []))
        return False

    receivers = [n for n, svc in services.items() if svc.get("command", [""])[0] == "std_udp_recv"]
    for receiver in receivers:
        assert needs(receiver, "std-assembler")
    assert needs("std-assembler", "writer-agent") and needs("writer-agent", "std-h5-writer")
    assert needs("writer-agent", "rabbitmq")


def test_base_image_installs_exactly_the_runtime_dependencies():
    dockerfile = (DOCKER / "std-daq-service-base" / "Dockerfile").read_text()
    installed = re.findall(r'^\s+"([^"]+)" \\$', dockerfile, re.M)
    assert sorted(installed) == sorted(setup_py_call()["install_requires"])


@pytest.mark.parametrize("script", sorted(DOCKER.glob("*.sh")), ids=lambda p: p.name)
def test_build_scripts_are_valid_bash_and_executable(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert script.stat().st_mode & 0o111


def test_service_build_refuses_an_unknown_version():
    result = subprocess.run(["bash", str(DOCKER / "build_std-daq-service.sh"), "no-such-revision-x"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "is not a git revision" in result.stderr


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read_string(path.read_text())
    return parser


@pytest.mark.parametrize("unit", sorted(SYSTEMD.glob("*.service")), ids=lambda p: p.name)
def test_systemd_units_run_project_commands_within_the_target(unit):
    parsed = read_unit(unit)
    exec_start = shlex.split(parsed["Service"]["ExecStart"])
    assert Path(exec_start[0]).name in console_scripts()
    assert exec_start[1] == "${STD_DAQ_CONFIG}"
    assert parsed["Install"]["WantedBy"] == "std-daq.target"
    assert parsed["Unit"]["PartOf"] == "std-daq.target"
    assert parsed["Service"]["KillSignal"] == "SIGTERM"
    assert parsed["Service"]["Restart"] == "on-failure"
    assert "StartLimitBurst" in parsed["Unit"]


def test_receiver_unit_is_instanced_by_module_id():
    parsed = read_unit(SYSTEMD / "std_udp_recv@.service")
    assert shlex.split(parsed["Service"]["ExecStart"])[-1] == "%i"
    assert "CPUAffinity" not in parsed["Service"]  # per instance, in a drop-in: an empty one pins nothing


@pytest.mark.parametrize("example", sorted(SYSTEMD.glob("*.service.d/*.conf.example")), ids=lambda p: p.parent.name)
def test_cpu_pinning_drop_ins_pin_to_real_cpu_lists(example):
    unit = example.parent.name.removesuffix(".d")
    assert (SYSTEMD / unit).is_file(), f"{example} is a drop-in for {unit}, which is not shipped"
    service = read_unit(example)["Service"]
    assert re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", service["CPUAffinity"])
    assert f"/etc/systemd/system/{unit.replace('@.', '@0.')}.d/" in example.read_text()  # says where it goes


def test_the_receivers_have_a_cpu_pinning_example():
    assert (SYSTEMD / "std_udp_recv@.service.d" / "cpu.conf.example").is_file()


def start_order() -> list[str]:
    """The project's units in the order systemd starts them (After= among themselves); it stops them in
    the reverse order."""
    units = {p.name: read_unit(p) for p in SYSTEMD.glob("*.service")}
    after = {name: {dep for dep in parsed["Unit"].get("After", "").split() if dep in units}
             for name, parsed in units.items()}
    order: list[str] = []
    while len(order) < len(units):
        ready = sorted(n for n in units if n not in order and after[n] <= set(order))
        assert ready, f"ordering cycle among {sorted(set(units) - set(order))}"
        order.extend(ready)
    return order


def stops_before(first: str, then: str) -> bool:
    """Whether stopping the target stops `first` before `then`: `first` is ordered After= `then`,
    directly or through others."""
    units = {p.name: read_unit(p) for p in SYSTEMD.glob("*.service")}
    seen, todo = set(), [first]
    while todo:
        for dep in units[todo.pop()]["Unit"].get("After", "").split():
            if dep == then:
                return True
            if dep in units and dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return False


def test_systemd_stops_the_receivers_first_and_the_writer_last():
    stop_order = [
        "std_udp_recv@.service", "std_assembler.service", "std_stream_send.service", "writer_agent.service",
        "std_h5_writer.service",
    ]
    for first, then in zip(stop_order, stop_order[1:]):
        assert stops_before(first, then), f"{first} must be After={then}, so that it stops first"
    assert stops_before("std_udp_recv@.service", "std_h5_writer.service")
    # On a replica server the stream receiver is the producer: it stops before the agent and the writer.
    assert stops_before("std_stream_recv.service", "writer_agent.service")
    assert stops_before("std_stream_recv.service", "std_h5_writer.service")
    order = start_order()
    assert order[0] == "std_h5_writer.service" and order[-1] == "std_udp_recv@.service"


def test_systemd_stop_order_is_the_launchers(make_config):
    from std_daq.launcher import pipeline_services

    _, config = make_config(stream_send={"to": "tcp://127.0.0.1:9610"})
    unit_of = {"udp_recv": "std_udp_recv@.service", "assembler": "std_assembler.service",
               "stream_send": "std_stream_send.service", "writer_agent": "writer_agent.service",
               "h5_writer": "std_h5_writer.service"}
    by_rank = sorted(pipeline_services("config.json", config), key=lambda spec: spec.stop_rank)
    units = list(dict.fromkeys(unit_of[spec.label.split("-")[0]] for spec in by_rank))
    for first, then in zip(units, units[1:]):
        assert stops_before(first, then), f"std-daq up stops {first} before {then}; systemd must too"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_and_drop_ins_pass_systemd_analyze_verify(tmp_path):
    for path in SYSTEMD.iterdir():
        if path.suffix in (".service", ".target"):
            shutil.copy(path, tmp_path / path.name)
    for example in SYSTEMD.glob("*.service.d/*.conf.example"):
        instance = example.parent.name.replace("@.", "@0.")
        (tmp_path / instance).mkdir(exist_ok=True)
        shutil.copy(example, tmp_path / instance / example.name.removesuffix(".example"))
    units = [p.name.replace("@.", "@0.") for p in tmp_path.iterdir() if p.suffix in (".service", ".target")]
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    # Only complaint allowed here: the console scripts are not installed in /opt/std-daq on this machine.
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and "/opt/std-daq/bin/" not in line]
    assert not problems, "\n".join(problems)


def test_every_service_has_a_unit():
    units = {p.name.split("@")[0].removesuffix(".service") for p in SYSTEMD.glob("*.service")}
    assert units == console_scripts() - {"std_udp_sim", "std-daq"}


def test_the_units_documentation_is_where_the_documented_installation_puts_it():
    """Documentation= of every unit names a file that the systemd steps of docs/operations.md install (the
    Docker image is not what runs the units)."""
    operations = (ROOT / "docs" / "operations.md").read_text()
    systemd_steps = operations.split("## systemd", 1)[1].split("\n## ", 1)[0]
    installed = re.search(r"^\s+install -d (\S+) && install -m 0644 docs/\*\.md (\S+)/\s", systemd_steps, re.M)
    assert installed, "the systemd steps of docs/operations.md do not install the docs"
    assert installed.group(1) == installed.group(2)
    for unit in sorted(SYSTEMD.glob("*.service")) + [SYSTEMD / "std-daq.target"]:
        documentation = read_unit(unit)["Unit"]["Documentation"]
        assert documentation.startswith(f"file://{installed.group(1)}/"), f"{unit.name}: {documentation}"
        assert (ROOT / "docs" / documentation.rsplit("/", 1)[1]).is_file(), f"{unit.name}: {documentation}"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def build_in_a_repository(tmp_path: Path, *args: str, tag: str | None = None
                          ) -> tuple[subprocess.CompletedProcess, list[str], dict[str, str]]:
    """build_std-daq-service.sh run in a small git repository of its own, with a `docker` that records its
    arguments and the build context it is sent (there is no Docker engine here): (result, docker's
    arguments, the context's files and their contents)."""
    import tarfile

    repo = tmp_path / "repo"
    (repo / "docker" / "std-daq-service").mkdir(parents=True)
    shutil.copy(DOCKER / "build_std-daq-service.sh", repo / "docker")
    shutil.copy(DOCKER / "std-daq-service" / "Dockerfile", repo / "docker" / "std-daq-service")
    (repo / ".gitignore").write_text(".venv/\n")
    (repo / "module.py").write_text("committed\n")
    (repo / "gone.py").write_text("committed, then deleted\n")
    git(repo.parent, "init", "-q", str(repo))
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    if tag is not None:
        git(repo, "tag", tag)
    (repo / "module.py").write_text("changed, not committed\n")
    (repo / "new.py").write_text("new, not added\n")
    (repo / "gone.py").unlink()
    (repo / ".venv").mkdir()
    (repo / ".venv" / "ignored.py").write_text("ignored\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/docker-args\ncat > {tmp_path}/context.tar\n')
    (bin_dir / "docker").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(["bash", str(repo / "docker" / "build_std-daq-service.sh"), *args], capture_output=True,
                            text=True, env=env, timeout=60)
    if result.returncode:
        return result, [], {}
    with tarfile.open(tmp_path / "context.tar") as tar:
        files = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    return result, (tmp_path / "docker-args").read_text().split(), files


def test_service_build_builds_the_checked_out_tree_by_default_in_a_repository_without_tags(tmp_path):
    result, args, files = build_in_a_repository(tmp_path)
    assert result.returncode == 0, result.stderr
    tag = git(tmp_path / "repo", "rev-parse", "--short", "HEAD") + "-dirty"  # uncommitted changes
    assert result.stdout.splitlines()[-1] == tag
    assert f"std-daq-service:{tag}" in args and f"STD_DAQ_VERSION={tag}" in args
    assert files["module.py"] == "changed, not committed\n" and files["new.py"] == "new, not added\n"
    assert "gone.py" not in files and ".venv/ignored.py" not in files
    assert "docker/std-daq-service/Dockerfile" in files


def test_service_build_builds_a_given_revision_exactly(tmp_path):
    result, args, files = build_in_a_repository(tmp_path, "v0.1.0", tag="v0.1.0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "v0.1.0" and "std-daq-service:v0.1.0" in args
    assert files["module.py"] == "committed\n" and files["gone.py"] == "committed, then deleted\n"
    assert "new.py" not in files
