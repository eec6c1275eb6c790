"""`osvm deploy --set KEY=VALUE`: how settings change a stored spec."""

import pytest

from osvm.deploy.manager import DeployError, apply_settings

SPEC = {
    "command": ["/usr/bin/node", "server.js"],
    "env": {"LOG_LEVEL": "info"},
    "resources": {"memory": "512MiB"},
    "ports": {"rpc": 0},
}


def test_set_string_value() -> None:
    result = apply_settings(SPEC, ["env.LOG_LEVEL=debug"])
    assert result["env"]["LOG_LEVEL"] == "debug"


def test_set_does_not_change_input() -> None:
    apply_settings(SPEC, ["env.LOG_LEVEL=debug"])
    assert SPEC["env"]["LOG_LEVEL"] == "info"


def test_set_toml_number_and_bool() -> None:
    result = apply_settings(SPEC, ["resources.cpus=1.5", "shell=false"])
    assert result["resources"]["cpus"] == 1.5
    assert result["shell"] is False


def test_set_list_index() -> None:
    result = apply_settings(SPEC, ["command[0]=/opt/node/bin/node"])
    assert result["command"] == ["/opt/node/bin/node", "server.js"]


def test_set_appends_at_list_end() -> None:
    result = apply_settings(SPEC, ["command[2]=--verbose"])
    assert result["command"][-1] == "--verbose"


def test_set_whole_list_as_toml() -> None:
    result = apply_settings(SPEC, ['command=["/bin/true"]'])
    assert result["command"] == ["/bin/true"]


def test_set_creates_missing_table() -> None:
    result = apply_settings(SPEC, ["update.min_healthy_time=5s"])
    assert result["update"] == {"min_healthy_time": "5s"}


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("env.LOG_LEVEL", "write KEY=VALUE"),
        ("command[9]=x", "index 9 is out of range"),
        ("env.LOG_LEVEL.x=1", "is not inside a table"),
        ("bad key=1", "use dotted names"),
    ],
)
def test_set_rejects_bad_setting(setting: str, fragment: str) -> None:
    with pytest.raises(DeployError) as caught:
        apply_settings(SPEC, [setting])
    assert fragment in str(caught.value)


def test_set_env_number_stays_string() -> None:
    result = apply_settings(SPEC, ["env.VERSION=2"])
    assert result["env"]["VERSION"] == "2"


def test_set_string_key_keeps_text() -> None:
    result = apply_settings(SPEC, ["resources.memory=1024"])
    assert result["resources"]["memory"] == "1024"
