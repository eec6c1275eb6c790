"""Tests of `osvm image` and the image checks of `osvm validate`, through the real command line.

Most tests run the CLI without a daemon on a private state directory. The image cache of each
state directory shares the kernels, agents and downloads of the test image cache (see
test_microvm_support.py), so only the image itself is built. The last test boots a microVM
through a real daemon and needs root, QEMU and the end-to-end setup of conftest.py.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest

from e2e import OSVM, Osvm, deployment_toml
from osvm.config.models import Component
from osvm.deploy.manager import DeployError, DeployManager
from osvm.images import BuiltImage, list_images
from osvm.store import Store
from osvm.store.events import EventBus
from test_images import compile_program, record_vm_instance
from test_microvm_support import IMAGE_CACHE, compile_server, link_shared_cache, require_guest_kernel, require_image_tools, require_qemu

# Bounds a hung command; never asserted as a performance limit.
CLI_TIMEOUT = 300.0
# Bounds a TCG boot of the test VM on a loaded 2-core host; never asserted as a performance limit.
BOOT_TIMEOUT = 240.0


def osvm_cli(state_dir: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `osvm --state-dir STATE_DIR ARGS...` and return the finished process."""
    return subprocess.run(
        [str(OSVM), "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=str(cwd) if cwd else None,
    )


def write_file(path: Path, components: dict[str, dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(deployment_toml("images", components))
    return path


def vm_component(image: dict[str, Any], command: list[str] | None = None) -> dict[str, Any]:
    return {"runtime": "microvm", "command": command or ["/app/server"], "image": image}


def share_test_cache(state_dir: Path) -> Path:
    """Create STATE_DIR/images with the shared kernels, agents and downloads linked in, and return it."""
    require_image_tools()
    require_guest_kernel()
    cache = state_dir / "images"
    cache.mkdir(parents=True)
    link_shared_cache(cache)
    return cache


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def write_server_file(tmp_path: Path) -> Path:
    """Compile a static server with unique bytes, so its image is new, and write a file with it as component web."""
    binary = compile_server(tmp_path, extra_bytes=secrets.token_bytes(16))
    return write_file(tmp_path / "deploy.toml", {"web": vm_component({"kind": "binary", "path": str(binary)})})


@pytest.fixture
def built_image(tmp_path: Path, state_dir: Path) -> BuiltImage:
    """An image of a unique static server, built with `osvm image build` into STATE_DIR/images."""
    cache = share_test_cache(state_dir)
    file = write_server_file(tmp_path)
    result = osvm_cli(state_dir, "image", "build", str(file))
    assert result.returncode == 0, result.stderr
    (image,) = list_images(cache)
    return image


# --- validate ------------------------------------------------------------------------------------


def test_validate_accepts_relative_static_binary(tmp_path: Path, state_dir: Path) -> None:
    project = tmp_path / "project"
    (project / "bin").mkdir(parents=True)
    compile_program(project / "bin", "server", "-static")
    file = write_file(project / "deploy.toml", {"web": vm_component({"kind": "binary", "path": "bin/server"})})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    result = osvm_cli(state_dir, "validate", str(file), cwd=elsewhere)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{file}: valid: deployment 'images' with 1 component(s): web"


def test_validate_resolves_against_file_directory(tmp_path: Path, state_dir: Path) -> None:
    # bin/server exists relative to the working directory but not to the file's directory.
    (tmp_path / "bin").mkdir()
    compile_program(tmp_path / "bin", "server", "-static")
    file = write_file(tmp_path / "project" / "deploy.toml", {"web": vm_component({"kind": "binary", "path": "bin/server"})})

    result = osvm_cli(state_dir, "validate", str(file), cwd=tmp_path)

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"osvm: error: {file}: components.web.image.path: {tmp_path}/project/bin/server does not exist: "
        f"correct image.path (a relative path is resolved against the deployment file's directory)"
    )


def image_case_source(tmp_path: Path, case: str) -> dict[str, Any]:
    """Return the [image] table of a validate case, creating the files it names under tmp_path."""
    if case == "missing path":
        return {"kind": "binary", "path": str(tmp_path / "absent")}
    if case == "directory for binary":
        return {"kind": "binary", "path": str(tmp_path)}
    if case == "file for directory":
        (tmp_path / "server").write_bytes(b"#!/bin/sh\n")
        return {"kind": "directory", "path": str(tmp_path / "server")}
    if case == "dynamic binary":
        return {"kind": "binary", "path": str(compile_program(tmp_path, "server"))}
    if case == "python script":
        (tmp_path / "server").write_text("#!/usr/bin/python3\nprint('hi')\n")
        return {"kind": "binary", "path": str(tmp_path / "server")}
    raise AssertionError(f"unknown case {case}")


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing path", "{tmp}/absent does not exist: correct image.path"),
        ("directory for binary", "{tmp} is a directory, but kind \"binary\" copies one file"),
        ("file for directory", "{tmp}/server is a file, but kind \"directory\" copies a directory"),
        ("dynamic binary", "{tmp}/server is dynamically linked (interpreter /lib"),
        ("python script", "{tmp}/server is a script for /usr/bin/python3 (its #! line)"),
    ],
)
def test_validate_rejects_bad_image_path(tmp_path: Path, state_dir: Path, case: str, fragment: str) -> None:
    file = write_file(tmp_path / "files" / "deploy.toml", {"web": vm_component(image_case_source(tmp_path, case))})

    result = osvm_cli(state_dir, "validate", str(file))

    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"osvm: error: {file}: components.web.image.path: ")
    assert fragment.format(tmp=tmp_path) in lines[0]


def test_up_rejects_bad_image_before_daemon(tmp_path: Path, state_dir: Path) -> None:
    # The host check runs before `osvm up` starts a daemon or applies anything.
    file = write_file(tmp_path / "files" / "deploy.toml", {"web": vm_component(image_case_source(tmp_path, "dynamic binary"))})

    result = osvm_cli(state_dir, "up", str(file))

    assert result.returncode == 1
    assert f"{file}: components.web.image.path: " in result.stderr
    assert "dynamically linked" in result.stderr
    assert not (state_dir / "osvm.sock").exists()


def test_validate_json_lists_image_issue(tmp_path: Path, state_dir: Path) -> None:
    file = write_file(tmp_path / "deploy.toml", {"web": vm_component({"kind": "binary", "path": str(tmp_path)})})

    result = osvm_cli(state_dir, "validate", "--json", str(file))

    assert result.returncode == 1
    output = json.loads(result.stdout)
    assert output["valid"] is False
    assert output["file"] == str(file)
    assert [issue["field"] for issue in output["issues"]] == ["components.web.image.path"]
    assert "is a directory, but kind \"binary\" copies one file" in output["issues"][0]["message"]


def test_validate_rejects_packages_for_binary(tmp_path: Path, state_dir: Path) -> None:
    binary = compile_program(tmp_path, "server", "-static")
    image = {"kind": "binary", "path": str(binary), "packages": ["curl"]}
    file = write_file(tmp_path / "deploy.toml", {"web": vm_component(image)})

    result = osvm_cli(state_dir, "validate", str(file))

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"osvm: error: {file}: components.web.image.packages: image kind 'binary' copies path and installs no "
        f"packages: remove packages, or set kind = \"debian\" to install them with debootstrap"
    )


# --- image build ---------------------------------------------------------------------------------


def test_build_then_reuse_reported(tmp_path: Path, state_dir: Path) -> None:
    cache = share_test_cache(state_dir)
    file = write_server_file(tmp_path)

    first = osvm_cli(state_dir, "image", "build", str(file))
    assert first.returncode == 0, first.stderr
    (image,) = list_images(cache)
    assert first.stdout.splitlines() == [
        "web: building a binary image (initramfs)",
        f"web: built image {image.short_digest} in {image.directory}",
    ]

    second = osvm_cli(state_dir, "image", "build", str(file))
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [
        f"web: reused the cached binary image {image.short_digest} (initramfs) in {image.directory}",
    ]

    as_json = osvm_cli(state_dir, "image", "build", "--json", str(file))
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {
        "images": [{"component": "web", "digest": image.digest, "directory": str(image.directory), "action": "reused"}]
    }


def test_build_json_reports_new_build(tmp_path: Path, state_dir: Path) -> None:
    cache = share_test_cache(state_dir)
    file = write_server_file(tmp_path)

    result = osvm_cli(state_dir, "image", "build", "--json", str(file))

    assert result.returncode == 0, result.stderr
    (image,) = list_images(cache)
    assert json.loads(result.stdout) == {
        "images": [{"component": "web", "digest": image.digest, "directory": str(image.directory), "action": "built"}]
    }


def test_build_rejects_dynamic_binary(tmp_path: Path, state_dir: Path) -> None:
    binary = compile_program(tmp_path, "server")
    file = write_file(tmp_path / "deploy.toml", {"web": vm_component({"kind": "binary", "path": str(binary)})})

    result = osvm_cli(state_dir, "image", "build", str(file))

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"osvm: error: web: cannot build the image: image.path {binary} is dynamically linked")
    assert "build it static" in result.stderr


# --- image rm without a daemon ---------------------------------------------------------------------


def test_rm_rejects_image_in_use(state_dir: Path, built_image: BuiltImage) -> None:
    record_vm_instance(state_dir, built_image, "web-1-aaaaaa", "running")

    result = osvm_cli(state_dir, "image", "rm", built_image.short_digest)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"osvm: error: image {built_image.short_digest} is in use by web (instance web-1-aaaaaa, running), "
    )
    assert "--force" in result.stderr
    assert built_image.initrd.exists()


def test_rm_json_lists_users(state_dir: Path, built_image: BuiltImage) -> None:
    record_vm_instance(state_dir, built_image, "web-1-aaaaaa", "starting")

    result = osvm_cli(state_dir, "image", "rm", "--json", built_image.digest)

    assert result.returncode == 1
    assert json.loads(result.stdout) == {
        "removed": None,
        "digest": built_image.digest,
        "in_use": [{"component": "web", "instance": "web-1-aaaaaa", "state": "starting"}],
    }
    assert built_image.initrd.exists()


def test_rm_force_removes_and_warns(state_dir: Path, built_image: BuiltImage) -> None:
    record_vm_instance(state_dir, built_image, "web-1-aaaaaa", "running")

    result = osvm_cli(state_dir, "image", "rm", "--force", built_image.short_digest)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"removed image {built_image.short_digest}"
    assert result.stderr.strip() == (
        f"osvm: warning: image {built_image.short_digest} was in use by web (instance web-1-aaaaaa, running): "
        f"they cannot restart until it is rebuilt, so run `osvm image build FILE` with their deployment file"
    )
    assert not built_image.directory.exists()


def test_rm_unused_image(state_dir: Path, built_image: BuiltImage) -> None:
    record_vm_instance(state_dir, built_image, "web-1-aaaaaa", "exited")

    result = osvm_cli(state_dir, "image", "rm", "--json", built_image.short_digest)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"removed": built_image.digest, "digest": built_image.digest, "in_use": []}
    assert not built_image.directory.exists()


# --- image rm with a daemon and a running microVM --------------------------------------------------


@pytest.mark.root
def test_rm_rejects_image_of_running_vm(osvm_stopped: Osvm) -> None:
    require_qemu()
    share_test_cache(osvm_stopped.state_dir)
    binary = compile_server(osvm_stopped.work_dir, extra_bytes=secrets.token_bytes(16))
    component = vm_component({"kind": "binary", "path": str(binary)}, command=[str(binary)])
    component.update({
        "ports": {"http": 0},
        "stop_grace_period": "3s",
        "vm": {"memory": "256MiB"},
        "probes": [{"type": "tcp", "port": "http"}],
    })  # fmt: skip
    file = osvm_stopped.write_deployment({"web": component})
    osvm_stopped.start_daemon()
    osvm_stopped.cli("up", str(file), "--timeout", str(int(BOOT_TIMEOUT)), timeout=BOOT_TIMEOUT + 60)
    instance = osvm_stopped.instance("web")
    (image,) = osvm_stopped.cli_json("image", "ls")["images"]

    rejected = osvm_stopped.cli("image", "rm", image["digest"][:12], check=False)
    assert rejected.returncode == 1
    assert f"is in use by web (instance {instance['id']}, running)" in rejected.stderr
    assert [listed["digest"] for listed in osvm_stopped.cli_json("image", "ls")["images"]] == [image["digest"]]

    osvm_stopped.cli("stop", "web")
    removed = osvm_stopped.cli("image", "rm", image["digest"][:12])
    assert removed.stdout.strip() == f"removed image {image['digest'][:12]}"
    assert osvm_stopped.cli_json("image", "ls")["images"] == []



def test_deploy_set_rejects_bad_image_path(tmp_path: Path) -> None:
    # A --set that points image.path at a file the guest cannot run stores no revision.
    binary = compile_program(tmp_path, "server", "-static")
    store = Store(tmp_path / "state.db")
    spec = Component.model_validate(vm_component({"kind": "binary", "path": str(binary)}))
    revision = store.add_revision("web", spec.model_dump(mode="json"), spec.spec_hash())
    store.upsert_component("web", "images", None, "running", revision)
    manager = DeployManager(store, EventBus(store), fleet=None)  # type: ignore[arg-type]

    for value, fragment in [("/usr/bin/python3", "is dynamically linked"), ("relative/server", "is relative")]:
        with pytest.raises(DeployError) as raised:
            manager.deploy("web", None, [f"image.path={value}"], "osvm deploy")
        assert str(raised.value).startswith(f"components.web.image.path: {value}")
        assert fragment in str(raised.value)
        assert raised.value.status == 422
    assert store.latest_revision("web")[0] == revision
