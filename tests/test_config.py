"""Tests of the deployment file layer: loading, validation errors, units and model helpers."""

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from osvm.config import load
from osvm.config.load import ConfigError, _issue_from_error, load_deployment, parse_deployment
from osvm.config.models import (
    MIN_VM_MEMORY,
    STORED_REVISION,
    Component,
    Deployment,
    ExecProbe,
    HttpProbe,
    JsonRpcProbe,
    SolanaProbe,
    TcpProbe,
)
from osvm.config.units import format_duration, format_size, parse_duration, parse_size

REPOSITORY = Path(__file__).resolve().parents[1]
PROBE_MODELS = (HttpProbe, JsonRpcProbe, SolanaProbe, TcpProbe, ExecProbe)

# A valid one-component file that the bad cases extend with one more line.
BASE = """\
name = "test"

[components.rpc]
command = ["ganache", "--port", "8545"]
"""

TWO_COMPONENTS = """\
name = "test"

[components.rpc]
command = ["ganache"]
ports = { rpc = 8545 }

[components.cache]
command = ["redis-server"]
"""

CYCLE = """\
name = "test"

[components.rpc]
command = ["ganache"]
depends_on = ["cache"]

[components.cache]
command = ["redis-server"]
depends_on = ["rpc"]
"""

# BASE as a microVM; the bad cases append keys to its [components.rpc.vm] table.
MICROVM = BASE + """\
runtime = "microvm"
image = { kind = "binary", path = "/usr/local/bin/ganache" }

[components.rpc.vm]
"""

# Each case: id, file text, field path of the issue, and a fragment of its message with the fix.
BAD_FILES = [
    ("unknown top-level key", 'name = "test"\nversion = 2\n' + BASE[len('name = "test"\n'):],
     "version", "unknown key 'version': remove it or correct its spelling"),
    ("unknown component key", BASE + "restart_policy = {}\n",
     "components.rpc.restart_policy", "did you mean 'restart'?"),
    ("unknown probe key", BASE + 'probes = [{ type = "tcp", port = 8545, timout = "1s" }]\n',
     "components.rpc.probes[0].timout", "did you mean 'timeout'?"),
    ("top-level key after a table", BASE + 'description = "x"\n',
     "components.rpc.description", "remove it or correct its spelling"),
    ("name after a table header", '[components.rpc]\ncommand = ["ganache"]\nname = "test"\n',
     "components.rpc.name", "move name above the first header"),
    ("missing name", '[components.rpc]\ncommand = ["ganache"]\n',
     "name", "missing required key 'name': add a line such as name ="),
    ("invalid deployment name", 'name = "Main Net"\n[components.rpc]\ncommand = ["ganache"]\n',
     "name", "use 1 to 63 lower-case letters"),
    ("missing command", 'name = "test"\n[components.rpc]\nshell = false\n',
     "components.rpc.command", "add the program and its arguments, such as command = ["),
    ("string command without shell", 'name = "test"\n[components.rpc]\ncommand = "ganache --port 8545"\n',
     "components.rpc.command", "or set shell = true"),
    ("list command with shell", BASE + "shell = true\n",
     "components.rpc.command", "write the shell command as a string, or remove shell = true"),
    ("empty command list", 'name = "test"\n[components.rpc]\ncommand = []\n',
     "components.rpc.command", "command is empty: write the program to run"),
    ("empty program name", 'name = "test"\n[components.rpc]\ncommand = ["", "--port"]\n',
     "components.rpc.command", "command is empty: write the program to run"),
    ("empty shell command", 'name = "test"\n[components.rpc]\ncommand = "  "\nshell = true\n',
     "components.rpc.command", "command is empty: write the shell command"),
    ("command of wrong type", 'name = "test"\n[components.rpc]\ncommand = 5\n',
     "components.rpc.command", "expected an array of strings, or a string with shell = true, got integer 5"),
    ("command element not a string", 'name = "test"\n[components.rpc]\ncommand = ["ganache", 8545]\n',
     "components.rpc.command[1]", "got integer 8545: put the value in double quotes"),
    ("port reference not declared", 'name = "test"\n[components.rpc]\ncommand = ["ganache", "-p", "${OSVM_PORT_RPC}"]\n',
     "components.rpc.command[2]", "refers to port 'rpc', which is not in ports (no ports declared): add it to ports"),
    ("unknown runtime", BASE + 'runtime = "docker"\n',
     "components.rpc.runtime", "unknown runtime 'docker': use \"process\""),
    ("planned runtime unikernel", BASE + 'runtime = "unikernel"\n',
     "components.rpc.runtime", "'unikernel' is not available in this version of osvm: use \"process\""),
    ("microvm without image", BASE + 'runtime = "microvm"\n',
     "components.rpc.image", "needs an [image] table"),
    ("vm table on process runtime", BASE + '[components.rpc.vm]\nvcpus = 2\n',
     "components.rpc.vm", "applies only to runtime \"microvm\""),
    ("memory size without valid unit", BASE + 'resources = { memory = "512XB" }\n',
     "components.rpc.resources.memory", "write a number with a unit such as \"512MiB\""),
    ("memory size without unit", BASE + "resources = { memory = 512 }\n",
     "components.rpc.resources.memory", "write the size with a unit, such as \"512MiB\""),
    ("negative cpus", BASE + "resources = { cpus = -1 }\n",
     "components.rpc.resources.cpus", "-1 is too small: use a number of at least 0.01"),
    ("pids zero", BASE + "resources = { pids = 0 }\n",
     "components.rpc.resources.pids", "0 is too small: use a number of at least 1"),
    ("pids as boolean", BASE + "resources = { pids = true }\n",
     "components.rpc.resources.pids", "got boolean true: write digits without quotes"),
    ("open_files too small", BASE + "resources = { open_files = 8 }\n",
     "components.rpc.resources.open_files", "8 is too small: use a number of at least 16"),
    ("port out of range", BASE + "ports = { rpc = 70000 }\n",
     "components.rpc.ports.rpc", "70000 is too large: use a number of at most 65535"),
    ("port name with capitals", BASE + "ports = { RPC = 8545 }\n",
     "components.rpc.ports.RPC", "invalid port name 'RPC': use 1 to 31 lower-case letters"),
    ("probe port out of range", BASE + 'probes = [{ type = "tcp", port = 70000 }]\n',
     "components.rpc.probes[0].port", "70000 is too large: use a number of at most 65535"),
    ("probe port as fraction", BASE + 'probes = [{ type = "tcp", port = 1.5 }]\n',
     "components.rpc.probes[0].port", "write a number from 1 to 65535, or a name declared in ports"),
    ("probe port in quotes", BASE + 'ports = { rpc = 8545 }\nprobes = [{ type = "tcp", port = "8545" }]\n',
     "components.rpc.probes[0].port", "write a port number without quotes, such as 8545"),
    ("probe port undeclared", BASE + 'ports = { rpc = 8545 }\nprobes = [{ type = "tcp", port = "ws" }]\n',
     "components.rpc.probes[0].port", "port name 'ws' is not in ports (declared: rpc): add it to ports"),
    ("unknown probe type", BASE + 'probes = [{ type = "grpc", port = 8545 }]\n',
     "components.rpc.probes[0].type", "unknown probe type 'grpc': use one of \"http\", \"jsonrpc\""),
    ("probe without type", BASE + "probes = [{ port = 8545 }]\n",
     "components.rpc.probes[0].type", "missing required key 'type': add the probe type"),
    ("jsonrpc probe without method", BASE + 'probes = [{ type = "jsonrpc", port = 8545 }]\n',
     "components.rpc.probes[0].method", "add the JSON-RPC method to call, such as method = \"eth_blockNumber\""),
    ("jsonrpc params of wrong type", BASE + 'probes = [{ type = "jsonrpc", port = 8545, method = "m", params = 1 }]\n',
     "components.rpc.probes[0].params", "expected an array or a table, got integer 1"),
    ("http probe relative path", BASE + 'probes = [{ type = "http", port = 8545, path = "health" }]\n',
     "components.rpc.probes[0].path", "does not start with '/': write it such as \"/health\""),
    ("http probe bad status", BASE + 'probes = [{ type = "http", port = 8545, expect_status = [99] }]\n',
     "components.rpc.probes[0].expect_status[0]", "99 is too small: use a number of at least 100"),
    ("exec probe empty command", BASE + 'probes = [{ type = "exec", command = [] }]\n',
     "components.rpc.probes[0].command", "must not be empty: add at least one element"),
    ("probe not a table", BASE + 'probes = ["tcp"]\n',
     "components.rpc.probes[0]", "expected a table, got string 'tcp'"),
    ("bad duration", BASE + 'probes = [{ type = "tcp", port = 8545, interval = "5 sec" }]\n',
     "components.rpc.probes[0].interval", "write a number with a unit ms, s, m or h"),
    ("zero probe interval", BASE + 'probes = [{ type = "tcp", port = 8545, interval = 0 }]\n',
     "components.rpc.probes[0].interval", "must be longer than zero, got 0s: write a duration such as \"5s\""),
    ("infinite duration", BASE + "stop_grace_period = inf\n",
     "components.rpc.stop_grace_period", "write a finite number of seconds"),
    ("backoff_max below backoff_initial", BASE + 'restart = { backoff_initial = "10s", backoff_max = "1s" }\n',
     "components.rpc.restart.backoff_max", "make backoff_max at least as long as backoff_initial"),
    ("zero backoff_initial", BASE + "restart = { backoff_initial = 0 }\n",
     "components.rpc.restart.backoff_initial", "write a duration such as \"1s\""),
    ("bad restart policy", BASE + 'restart = { policy = "sometimes" }\n',
     "components.rpc.restart.policy", "invalid value 'sometimes': use 'always', 'on-failure' or 'never'"),
    ("depends_on unknown", BASE + 'depends_on = ["db"]\n',
     "components.rpc.depends_on[0]", "unknown component 'db' (declared: rpc): name a component of this file"),
    ("self-dependency", BASE + 'depends_on = ["rpc"]\n',
     "components.rpc.depends_on[0]", "component 'rpc' depends on itself: remove this entry"),
    ("dependency cycle", CYCLE, "components.cache.depends_on", "dependency cycle cache -> rpc -> cache"),
    ("duplicate fixed port", TWO_COMPONENTS + "ports = { redis = 8545 }\n",
     "components.cache.ports.redis", "port 8545 is already used by components.rpc.ports.rpc: choose another port"),
    ("bad stop_signal", BASE + 'stop_signal = "SIGSTOPP"\n',
     "components.rpc.stop_signal", "unknown signal 'SIGSTOPP': use a name such as \"SIGTERM\""),
    ("stop_signal that pauses", BASE + 'stop_signal = "SIGSTOP"\n',
     "components.rpc.stop_signal", "does not end a process: use a signal that does"),
    ("reserved OSVM_ env var", BASE + 'env = { OSVM_PORT_RPC = "1" }\n',
     "components.rpc.env.OSVM_PORT_RPC", "is reserved because osvm sets the names starting with OSVM_"),
    ("invalid env var name", BASE + 'env = { "log.level" = "debug" }\n',
     "components.rpc.env.\"log.level\"", "use letters, digits and underscores"),
    ("env value not a string", BASE + "env = { THREADS = 4 }\n",
     "components.rpc.env.THREADS", "expected a string, got integer 4: put the value in double quotes"),
    ("relative workdir", BASE + 'workdir = "data"\n',
     "components.rpc.workdir", "is relative: write an absolute path"),
    ("invalid user", BASE + 'user = "node operator"\n',
     "components.rpc.user", "write a user name such as \"osvm\" or a numeric user id"),
    ("shell as string", BASE + 'shell = "yes"\n',
     "components.rpc.shell", "expected a boolean, got string 'yes': write true or false without quotes"),
    ("bad component name", 'name = "test"\n[components.Geth_1]\ncommand = ["geth"]\n',
     "components.Geth_1", "invalid name 'Geth_1': use 1 to 63 lower-case letters, digits and '-'"),
    ("component not a table", 'name = "test"\ncomponents = { rpc = 5 }\n',
     "components.rpc", "expected a table, got integer 5"),
    ("no components", 'name = "test"\n[components]\n',
     "components", "add at least one [components.NAME] table"),
    ("components missing", 'name = "test"\n',
     "components", "missing required key 'components'"),
    ("bad network mode", BASE + 'network = { mode = "bridge" }\n',
     "components.rpc.network.mode", "invalid value 'bridge': use 'host' or 'namespace'"),
    ("host port zero", MICROVM + "host_ports = [0]\n",
     "components.rpc.vm.host_ports[0]", "invalid host port 0: use a number from 1 to 65535"),
    ("host port too large", MICROVM + "host_ports = [5000, 70000]\n",
     "components.rpc.vm.host_ports[1]", "invalid host port 70000: use a number from 1 to 65535"),
    ("host port listed twice", MICROVM + "host_ports = [5000, 6000, 5000]\n",
     "components.rpc.vm.host_ports[2]", "host port 5000 is listed twice, also at host_ports[0]: remove one"),
    ("too many host ports", MICROVM + f"host_ports = {list(range(1000, 1033))}\n",
     "components.rpc.vm.host_ports", "33 host ports listed, at most 32 are supported: remove some"),
    ("host port equal to fixed port", MICROVM.replace("[components.rpc.vm]", "ports = { rpc = 8545 }\n\n[components.rpc.vm]")
     + "host_ports = [8545]\n",
     "components.rpc.vm.host_ports[0]", "host port 8545 is also the fixed port ports.rpc"),
    ("binary image without path", BASE + 'runtime = "microvm"\nimage = { kind = "binary" }\n',
     "components.rpc.image.path", "image kind 'binary' needs path: set it to the host binary to copy"),
    ("debian image with path", BASE + 'runtime = "microvm"\nimage = { kind = "debian", path = "/srv/app" }\n',
     "components.rpc.image.path", "image kind \"debian\" takes packages, not path: remove path"),
    ("binary image with packages",
     BASE + 'runtime = "microvm"\nimage = { kind = "binary", path = "/usr/local/bin/ganache", packages = ["curl"] }\n',
     "components.rpc.image.packages",
     "image kind 'binary' copies path and installs no packages: remove packages, or set kind = \"debian\""),
    ("vm memory below the boot minimum", MICROVM + 'memory = "16MiB"\n',
     "components.rpc.vm.memory",
     "16 MiB is below the 128 MiB a guest needs to boot: set memory to \"128MiB\" or more"),
    ("vm memory in decimal units below the minimum", MICROVM + 'memory = "100M"\n',
     "components.rpc.vm.memory", "95.3674 MiB is below the 128 MiB a guest needs to boot"),
    ("directory image with packages",
     BASE + 'runtime = "microvm"\nimage = { kind = "directory", path = "/srv/app", packages = ["curl"] }\n',
     "components.rpc.image.packages", "image kind 'directory' copies path and installs no packages"),
]


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_bad_file_reports_path_and_fix(tmp_path: Path, text: str, path: str, fragment: str) -> None:
    file = tmp_path / "deploy.toml"
    file.write_text(text)

    with pytest.raises(ConfigError) as caught:
        load_deployment(file)

    rendered = str(caught.value)
    matching = [issue for issue in caught.value.issues if issue.path == path]
    assert matching, f"no issue at {path}: {rendered}"
    assert str(file) in rendered
    assert f"{file}: {path}: " in rendered
    assert any(fragment in issue.message for issue in matching), rendered


def test_bad_file_table_size() -> None:
    assert len(BAD_FILES) >= 25
    assert len({case[0] for case in BAD_FILES}) == len(BAD_FILES)


# --- file-level errors -----------------------------------------------------------------------


def test_invalid_toml_names_line(tmp_path: Path) -> None:
    file = tmp_path / "deploy.toml"
    file.write_text('name = "test"\n[components.rpc]\ncommand ["ganache"]\n')

    with pytest.raises(ConfigError) as caught:
        load_deployment(file)

    rendered = str(caught.value)
    assert rendered.startswith(f"{file}: invalid TOML at line 3")
    assert "correct the syntax there" in rendered
    assert caught.value.issues[0].path == ""


def test_duplicate_toml_table_rejected() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_deployment(BASE + '[components.rpc]\ncommand = ["x"]\n', "deploy.toml")

    assert "invalid TOML" in str(caught.value)


def test_file_not_found(tmp_path: Path) -> None:
    file = tmp_path / "missing.toml"

    with pytest.raises(ConfigError) as caught:
        load_deployment(file)

    assert str(caught.value) == f"{file}: file not found: check the path"


def test_directory_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_deployment(tmp_path)

    assert "is a directory: name a .toml deployment file" in str(caught.value)


def test_non_utf8_file_rejected() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_deployment(b'name = "\xff"\n', "deploy.toml")

    assert str(caught.value) == "deploy.toml: not valid UTF-8 at byte 8: save the file as UTF-8, which TOML requires"


def test_byte_order_mark_accepted() -> None:
    deployment = parse_deployment(b"\xef\xbb\xbf" + BASE.encode(), "deploy.toml")

    assert deployment.name == "test"


# --- error reporting -------------------------------------------------------------------------


def test_union_mismatch_collapsed_to_one_issue() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_deployment(BASE + 'probes = [{ type = "tcp", port = 70000 }]\n', "deploy.toml")

    assert len(caught.value.issues) == 1
    assert caught.value.issues[0].path == "components.rpc.probes[0].port"


def test_command_union_collapsed_to_one_issue() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_deployment('name = "test"\n[components.rpc]\ncommand = ["ganache", 1]\n', "deploy.toml")

    assert [issue.path for issue in caught.value.issues] == ["components.rpc.command[1]"]


def test_all_issues_reported_together() -> None:
    text = BASE + 'runtime = "docker"\nresources = { pids = 0 }\nenv = { OSVM_X = "1", OSVM_Y = "2" }\n'

    with pytest.raises(ConfigError) as caught:
        parse_deployment(text, "deploy.toml")

    paths = {issue.path for issue in caught.value.issues}
    assert paths == {
        "components.rpc.runtime",
        "components.rpc.resources.pids",
        "components.rpc.env.OSVM_X",
        "components.rpc.env.OSVM_Y",
    }


def test_every_unknown_dependency_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_deployment(BASE + 'depends_on = ["db", "cache"]\n', "deploy.toml")

    paths = [issue.path for issue in caught.value.issues]
    assert paths == ["components.rpc.depends_on[0]", "components.rpc.depends_on[1]"]


def test_probe_key_named_like_type() -> None:
    # The probe type also appears in pydantic's error location. A key of the same name must still be reported.
    with pytest.raises(ConfigError) as caught:
        parse_deployment(BASE + 'probes = [{ type = "tcp", port = 8545, tcp = 1 }]\n', "deploy.toml")

    assert [issue.path for issue in caught.value.issues] == ["components.rpc.probes[0].tcp"]


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_deployment(BASE + "resources = { disk = 1 }\n", "deploy.toml")

    assert "(valid keys: memory, cpus, pids, open_files)" in caught.value.issues[0].message


def test_probe_tags_match_models() -> None:
    tags = tuple(model.model_fields["type"].annotation.__args__[0] for model in PROBE_MODELS)

    assert load._PROBE_TAGS == tags


def test_error_to_json() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_deployment(BASE + 'runtime = "unikernel"\n', "deploy.toml")

    document = caught.value.to_json()
    assert document["file"] == "deploy.toml"
    assert len(document["issues"]) == 1
    assert document["issues"][0]["field"] == "components.rpc.runtime"
    assert "not available in this version" in document["issues"][0]["message"]


# --- good files ------------------------------------------------------------------------------


def test_minimal_file_defaults() -> None:
    deployment = parse_deployment(BASE, "deploy.toml")

    component = deployment.components["rpc"]
    assert deployment.name == "test"
    assert component.shell is False
    assert component.env == {}
    assert component.workdir is None
    assert component.user is None
    assert component.runtime == "process"
    assert component.ports == {}
    assert component.probes == []
    assert component.depends_on == []
    assert component.stop_signal == "SIGTERM"
    assert component.stop_grace_period == 10.0
    assert component.network.mode == "host"


def test_resource_and_restart_defaults() -> None:
    component = parse_deployment(BASE, "deploy.toml").components["rpc"]

    assert component.resources.memory is None
    assert component.resources.cpus is None
    assert component.resources.pids is None
    assert component.resources.open_files is None
    assert component.restart.policy == "always"
    assert component.restart.max_restarts == 5
    assert component.restart.window == 60.0
    assert component.restart.backoff_initial == 1.0
    assert component.restart.backoff_max == 30.0
    assert component.restart.backoff_multiplier == 2.0


def test_probe_defaults() -> None:
    component = parse_deployment(BASE + 'probes = [{ type = "solana", port = 8899 }]\n', "deploy.toml").components["rpc"]

    probe = component.probes[0]
    assert isinstance(probe, SolanaProbe)
    assert probe.interval == 5.0
    assert probe.startup_interval == 0.25
    assert probe.timeout == 2.0
    assert probe.success_threshold == 1
    assert probe.failure_threshold == 3
    assert probe.startup_grace == 0.0
    assert probe.liveness is False
    assert probe.health_path == "/health"
    assert probe.get_health is True
    assert probe.rpc_path == "/"


@pytest.mark.parametrize(
    ("written", "seconds"),
    [('"250ms"', 0.25), ('"5m"', 300.0), ('"1h"', 3600.0), ('"1.5s"', 1.5), ("3", 3.0), ("0.5", 0.5)],
)
def test_duration_forms(written: str, seconds: float) -> None:
    text = BASE + f"stop_grace_period = {written}\n"

    component = parse_deployment(text, "deploy.toml").components["rpc"]

    assert component.stop_grace_period == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ('"512MiB"', 512 * 1024**2),
        ('"2G"', 2 * 1000**3),
        ('"2GiB"', 2 * 1024**3),
        ('"100M"', 100 * 1000**2),
        ('"64Mi"', 64 * 1024**2),
        ("1073741824", 1024**3),
    ],
)
def test_size_forms(written: str, size: int) -> None:
    text = BASE + f"resources = {{ memory = {written} }}\n"

    component = parse_deployment(text, "deploy.toml").components["rpc"]

    assert component.resources.memory == size


def test_numbers_accepted_for_float_fields() -> None:
    text = BASE + "resources = { cpus = 2 }\nrestart = { backoff_multiplier = 3 }\n"

    component = parse_deployment(text, "deploy.toml").components["rpc"]

    assert component.resources.cpus == 2.0
    assert component.restart.backoff_multiplier == 3.0


def test_start_order_follows_depends_on() -> None:
    text = """\
name = "test"

[components.rpc]
command = ["ganache"]
depends_on = ["indexer", "cache"]

[components.indexer]
command = ["indexer"]
depends_on = ["cache"]

[components.cache]
command = ["redis-server"]

[components.metrics]
command = ["exporter"]
"""
    deployment = parse_deployment(text, "deploy.toml")

    order = deployment.start_order()
    assert sorted(order) == ["cache", "indexer", "metrics", "rpc"]
    assert order.index("cache") < order.index("indexer") < order.index("rpc")
    assert order == ["cache", "indexer", "metrics", "rpc"]


def test_spec_hash_stable() -> None:
    first = parse_deployment(BASE + 'env = { A = "1", B = "2" }\n', "deploy.toml").components["rpc"]
    second = parse_deployment(BASE + 'env = { B = "2", A = "1" }\n', "deploy.toml").components["rpc"]

    assert first.spec_hash() == first.spec_hash()
    assert first.spec_hash() == second.spec_hash()
    assert len(first.spec_hash()) == 64


def test_spec_hash_ignores_unit_form() -> None:
    seconds = parse_deployment(BASE + "stop_grace_period = 90\n", "deploy.toml").components["rpc"]
    minutes = parse_deployment(BASE + 'stop_grace_period = "1.5m"\n', "deploy.toml").components["rpc"]

    assert seconds.spec_hash() == minutes.spec_hash()


@pytest.mark.parametrize(
    "change",
    [
        'command = ["ganache", "--port", "8546"]',
        'env = { A = "1" }',
        'resources = { memory = "1GiB" }',
        'probes = [{ type = "tcp", port = 8545 }]',
        'restart = { policy = "never" }',
        'stop_grace_period = "11s"',
    ],
)
def test_spec_hash_changes_with_spec(change: str) -> None:
    original = parse_deployment(BASE, "deploy.toml").components["rpc"]
    text = BASE.replace('command = ["ganache", "--port", "8545"]\n', "") + change + "\n"
    if not change.startswith("command"):
        text += 'command = ["ganache", "--port", "8545"]\n'

    changed = parse_deployment(text, "deploy.toml").components["rpc"]

    assert changed.spec_hash() != original.spec_hash()


def test_shell_command_argv() -> None:
    text = 'name = "test"\n[components.rpc]\ncommand = "exec ganache --port $PORT"\nshell = true\n'

    component = parse_deployment(text, "deploy.toml").components["rpc"]

    assert component.argv() == ["/bin/sh", "-c", "exec ganache --port $PORT"]


def test_list_command_argv() -> None:
    component = parse_deployment(BASE, "deploy.toml").components["rpc"]

    assert component.argv() == ["ganache", "--port", "8545"]


def test_port_reference_to_declared_port() -> None:
    text = 'name = "test"\n[components.rpc]\ncommand = ["ganache", "-p", "${OSVM_PORT_RPC}"]\nports = { rpc = 0 }\n'

    component = parse_deployment(text, "deploy.toml").components["rpc"]

    assert component.argv() == ["ganache", "-p", "${OSVM_PORT_RPC}"]


def test_probe_types_parsed() -> None:
    text = BASE + """\
ports = { rpc = 8545 }
probes = [
    { type = "http", port = "rpc", path = "/health", expect_status = [200] },
    { type = "jsonrpc", port = "rpc", method = "eth_blockNumber" },
    { type = "solana", port = 8899 },
    { type = "tcp", port = "rpc" },
    { type = "exec", command = ["redis-cli", "ping"] },
]
"""
    probes = parse_deployment(text, "deploy.toml").components["rpc"].probes

    assert [type(probe) for probe in probes] == [HttpProbe, JsonRpcProbe, SolanaProbe, TcpProbe, ExecProbe]
    assert probes[0].port == "rpc"
    assert probes[1].params == []
    assert probes[2].port == 8899


def test_stop_signal_normalized() -> None:
    component = parse_deployment(BASE + 'stop_signal = "int"\n', "deploy.toml").components["rpc"]

    assert component.stop_signal == "SIGINT"


def test_vm_memory_minimum_accepted() -> None:
    deployment = parse_deployment(MICROVM + 'memory = "128MiB"\n', "deploy.toml")
    vm = deployment.components["rpc"].vm
    assert vm is not None
    assert vm.memory == MIN_VM_MEMORY


def test_image_problems_reported_together() -> None:
    text = BASE + 'runtime = "microvm"\nimage = { kind = "binary", packages = ["curl"] }\n'
    with pytest.raises(ConfigError) as caught:
        parse_deployment(text, "deploy.toml")
    assert [issue.path for issue in caught.value.issues] == ["components.rpc.image.path", "components.rpc.image.packages"]


def test_host_ports_parsed() -> None:
    deployment = parse_deployment(MICROVM + "host_ports = [5000, 65535]\n", "deploy.toml")

    vm = deployment.components["rpc"].vm
    assert vm is not None
    assert vm.host_ports == [5000, 65535]


def test_allocated_ports_may_repeat() -> None:
    text = TWO_COMPONENTS.replace("rpc = 8545", "rpc = 0") + "ports = { redis = 0 }\n"

    deployment = parse_deployment(text, "deploy.toml")

    assert deployment.components["rpc"].ports == {"rpc": 0}
    assert deployment.components["cache"].ports == {"redis": 0}


def test_duplicate_port_rejected_in_namespace_mode() -> None:
    text = TWO_COMPONENTS + 'ports = { redis = 8545 }\nnetwork = { mode = "namespace" }\n'

    with pytest.raises(ConfigError) as caught:
        parse_deployment(text, "deploy.toml")

    assert [issue.path for issue in caught.value.issues] == ["components.cache.ports.redis"]


def test_duplicate_port_within_component() -> None:
    text = BASE + "ports = { rpc = 8545, ws = 8545 }\n"

    with pytest.raises(ConfigError) as caught:
        parse_deployment(text, "deploy.toml")

    assert [issue.path for issue in caught.value.issues] == ["components.rpc.ports.ws"]


def test_components_built_in_python() -> None:
    # Other packages build models directly. That path is not strict, unlike reading a file.
    component = Component(command=["redis-server"], ports={"redis": 6379})
    deployment = Deployment(name="test", components={"cache": component})

    assert deployment.start_order() == ["cache"]


def test_program_paths_resolved() -> None:
    text = """\
name = "test"

[components.rpc]
command = ["../vendor/ganache/bin/ganache", "./relative-argument"]
probes = [{ type = "exec", command = ["./check.sh", "./x"] }]

[components.cache]
command = ["redis-server"]

[components.shell]
command = "./start.sh"
shell = true
"""
    deployment = parse_deployment(text, "deploy.toml").with_paths_resolved("/srv/osvm/examples")

    assert deployment.components["rpc"].argv() == ["/srv/osvm/vendor/ganache/bin/ganache", "./relative-argument"]
    assert deployment.components["rpc"].probes[0].command == ["/srv/osvm/examples/check.sh", "./x"]
    assert deployment.components["cache"].argv() == ["redis-server"]
    assert deployment.components["shell"].argv() == ["/bin/sh", "-c", "./start.sh"]


def test_issue_from_single_error() -> None:
    # The control API validates JSON itself and turns each pydantic error into an issue.
    document = {"name": "test", "components": {"rpc": {"command": ["x"], "probes": [{"type": "tcp", "port": "RPC"}]}}}

    with pytest.raises(ValidationError) as caught:
        Deployment.model_validate(document)

    issues = [_issue_from_error(error) for error in caught.value.errors()]
    assert {issue.path for issue in issues} == {"components.rpc.probes[0].port"}
    assert any("invalid port name 'RPC'" in issue.message for issue in issues)


def test_example_local_rpc_loads() -> None:
    example = REPOSITORY / "examples" / "local-rpc.toml"
    if not example.exists():
        pytest.skip("examples/local-rpc.toml does not exist yet")

    deployment = load_deployment(example)

    order = deployment.start_order()
    assert sorted(order) == sorted(deployment.components)
    for name, component in deployment.components.items():
        for dependency in component.depends_on:
            assert order.index(dependency) < order.index(name)


def test_reference_example_loads() -> None:
    reference = REPOSITORY / "docs" / "configuration.md"
    if not reference.exists():
        pytest.skip("docs/configuration.md does not exist")
    match = re.search(r"```toml\n(.*?)```", reference.read_text(), re.DOTALL)
    assert match is not None, "docs/configuration.md has no ```toml block"

    deployment = parse_deployment(match.group(1), "docs/configuration.md")

    assert deployment.start_order() == ["cache", "rpc", "validator"]
    assert [type(probe) for probe in deployment.components["validator"].probes] == [SolanaProbe, HttpProbe, ExecProbe]


# --- units -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0.0, 0.0005, 0.25, 1.0, 1.5, 90.0, 3600.0])
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("size", [1, 1000, 1024, 512 * 1024**2, 3 * 1024**3])
def test_size_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("value", ["10", "-1s", "1d", "", True, float("nan"), [1]])
def test_invalid_durations_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", ["2 pages", "1.5.5G", "0", 0, -5, 1.5, False])
def test_invalid_sizes_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(value)


def test_stored_revision_skips_newer_rules() -> None:
    # A revision stored before the vm.memory minimum and the packages rule existed stays readable.
    stored = {
        "runtime": "microvm",
        "command": ["/app/server"],
        "vm": {"memory": 64 * 1024 * 1024},
        "image": {"kind": "binary", "path": "/srv/server", "packages": ["curl"]},
    }
    with pytest.raises(ValidationError):
        Component.model_validate(stored)

    spec = Component.model_validate(stored, context={STORED_REVISION: True})

    assert spec.vm is not None
    assert spec.vm.memory == 64 * 1024 * 1024
    assert spec.image is not None
    assert spec.image.packages == ["curl"]
