"""Tests of the Firecracker driver against tests/firecracker_simulator.py.

No Firecracker binary exists here, so the client runs against the simulator, which was written
from Firecracker's published API, and the runtime spawns a fake `firecracker` program that serves
the simulator. Passing these tests shows that the driver follows the published API as the
simulator understands it, not that it works with a real Firecracker.
"""

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from firecracker_simulator import (
    DESERIALIZE_PREFIX,
    MEMORY_SIZE_ERROR,
    POST_BOOT_ERROR,
    PRE_BOOT_ERROR,
    VCPU_COUNT_ERROR,
    FirecrackerSimulator,
    echo_service,
)
from osvm.config.models import Component
from osvm.runtimes import procinfo
from osvm.runtimes.base import LaunchPlan
from osvm.runtimes.firecracker import (
    Drive,
    FirecrackerClient,
    FirecrackerError,
    FirecrackerRuntime,
    FirecrackerRuntimeError,
    FirecrackerUnavailable,
    FirecrackerVm,
    GuestImages,
    NetworkInterface,
    VmConfig,
    VsockDevice,
    uses_firecracker,
)
from osvm.store import Store
from osvm.vsock import GuestPortRefused, connect

TESTS_DIR = Path(__file__).resolve().parent
ECHO_PORT = 5000


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory under /tmp with a short path, because a Unix socket path must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="osvm-fc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def boot_files(short_dir: Path) -> tuple[Path, Path]:
    """A kernel and a root filesystem file. The simulator only checks that they exist."""
    kernel = short_dir / "vmlinux"
    rootfs = short_dir / "rootfs.ext4"
    kernel.write_bytes(b"kernel")
    rootfs.write_bytes(b"rootfs")
    return kernel, rootfs


@pytest.fixture
async def simulator(short_dir: Path) -> AsyncIterator[FirecrackerSimulator]:
    sim = FirecrackerSimulator(short_dir / "api.sock", instance_id="test-vm", guest_services={ECHO_PORT: echo_service})
    await sim.start()
    yield sim
    await sim.close()


@pytest.fixture
async def client(simulator: FirecrackerSimulator) -> AsyncIterator[FirecrackerClient]:
    async with FirecrackerClient(simulator.api_socket_path) as api:
        yield api


def _config(boot_files: tuple[Path, Path], short_dir: Path, **changes: Any) -> VmConfig:
    kernel, rootfs = boot_files
    values: dict[str, Any] = {
        "kernel_image_path": kernel,
        "boot_args": "console=ttyS0 reboot=k panic=1",
        "drives": (Drive("rootfs", rootfs, is_root_device=True, is_read_only=False),),
        "vcpu_count": 2,
        "mem_size_mib": 256,
        "network_interfaces": (NetworkInterface("eth0", "tap0", "06:00:ac:10:00:02"),),
        "vsock": VsockDevice(3, short_dir / "v.sock"),
    }
    values.update(changes)
    return VmConfig(**values)


async def _raw(simulator: FirecrackerSimulator, method: str, path: str, body: Any = None, content: bytes | None = None) -> httpx.Response:
    """Send one request to the simulator without the client's help, for bodies the client never sends."""
    transport = httpx.AsyncHTTPTransport(uds=simulator.api_socket_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        if content is not None:
            return await http.request(method, path, content=content)
        return await http.request(method, path, json=body)


async def _boot(client: FirecrackerClient, boot_files: tuple[Path, Path], short_dir: Path) -> None:
    await FirecrackerVm(client).boot(_config(boot_files, short_dir))


# --- client against the simulator: happy path -------------------------------------------------


async def test_boot_calls_in_order(simulator: FirecrackerSimulator, client: FirecrackerClient,
                                   boot_files: tuple[Path, Path], short_dir: Path) -> None:
    await _boot(client, boot_files, short_dir)
    assert simulator.calls() == [
        "PUT /boot-source",
        "PUT /drives/rootfs",
        "PUT /machine-config",
        "PUT /network-interfaces/eth0",
        "PUT /vsock",
        "PUT /actions",
    ]
    assert all(request.status == 204 for request in simulator.requests)


async def test_boot_request_bodies(simulator: FirecrackerSimulator, client: FirecrackerClient,
                                   boot_files: tuple[Path, Path], short_dir: Path) -> None:
    kernel, rootfs = boot_files
    await _boot(client, boot_files, short_dir)
    bodies = [request.body for request in simulator.requests]
    assert bodies[0] == {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0 reboot=k panic=1"}
    assert bodies[1] == {"drive_id": "rootfs", "path_on_host": str(rootfs), "is_root_device": True, "is_read_only": False}
    assert bodies[2] == {"vcpu_count": 2, "mem_size_mib": 256, "smt": False, "track_dirty_pages": False}
    assert bodies[3] == {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}
    assert bodies[4] == {"guest_cid": 3, "uds_path": str(short_dir / "v.sock")}
    assert bodies[5] == {"action_type": "InstanceStart"}


async def test_describe_instance_states(simulator: FirecrackerSimulator, client: FirecrackerClient,
                                        boot_files: tuple[Path, Path], short_dir: Path) -> None:
    info = await client.describe_instance()
    assert info == {"id": "test-vm", "state": "Not started", "vmm_version": "1.17.0-dev", "app_name": "Firecracker"}
    await _boot(client, boot_files, short_dir)
    assert (await client.describe_instance())["state"] == "Running"
    await client.pause()
    assert (await client.describe_instance())["state"] == "Paused"
    await client.resume()
    assert (await client.describe_instance())["state"] == "Running"


async def test_initrd_boot_without_drives(simulator: FirecrackerSimulator, client: FirecrackerClient,
                                          boot_files: tuple[Path, Path], short_dir: Path) -> None:
    initrd = short_dir / "initrd.cpio"
    initrd.write_bytes(b"initrd")
    await FirecrackerVm(client).boot(_config(boot_files, short_dir, drives=(), network_interfaces=(), vsock=None,
                                             initrd_path=initrd))
    assert simulator.calls() == ["PUT /boot-source", "PUT /machine-config", "PUT /actions"]
    assert simulator.requests[0].body["initrd_path"] == str(initrd)


async def test_vsock_reaches_guest_after_boot(simulator: FirecrackerSimulator, client: FirecrackerClient,
                                              boot_files: tuple[Path, Path], short_dir: Path) -> None:
    await _boot(client, boot_files, short_dir)
    reader, writer = await connect(short_dir / "v.sock", ECHO_PORT)
    writer.write(b"through the vsock")
    assert await asyncio.wait_for(reader.readexactly(17), 5) == b"through the vsock"
    writer.close()
    with pytest.raises(GuestPortRefused, match="guest port 5999 refused"):
        await connect(short_dir / "v.sock", 5999)


# --- client against the simulator: errors ------------------------------------------------------


async def test_error_message_format(simulator: FirecrackerSimulator, client: FirecrackerClient,
                                    boot_files: tuple[Path, Path], short_dir: Path) -> None:
    await _boot(client, boot_files, short_dir)
    with pytest.raises(FirecrackerError) as raised:
        await client.put_drive("rootfs", boot_files[1], is_root_device=True, is_read_only=False)
    error = raised.value
    assert str(error) == f"PUT /drives/rootfs failed: 400: {POST_BOOT_ERROR}"
    assert error.status == 400
    assert error.method == "PUT"
    assert error.path == "/drives/rootfs"
    assert error.fault_message == POST_BOOT_ERROR


async def test_start_before_boot_source(simulator: FirecrackerSimulator, client: FirecrackerClient) -> None:
    with pytest.raises(FirecrackerError) as raised:
        await client.instance_start()
    assert raised.value.fault_message == "Start microvm error: Cannot start microvm without kernel configuration."
    assert (await client.describe_instance())["state"] == "Not started"


@pytest.mark.parametrize(
    ("call", "path"),
    [
        ("boot_source", "/boot-source"),
        ("drive", "/drives/data"),
        ("machine_config", "/machine-config"),
        ("network", "/network-interfaces/eth1"),
        ("vsock", "/vsock"),
        ("start", "/actions"),
        ("load_snapshot", "/snapshot/load"),
    ],
)
async def test_pre_boot_call_after_start(simulator: FirecrackerSimulator, client: FirecrackerClient,
                                         boot_files: tuple[Path, Path], short_dir: Path, call: str, path: str) -> None:
    kernel, rootfs = boot_files
    await _boot(client, boot_files, short_dir)
    calls = {
        "boot_source": lambda: client.put_boot_source(kernel),
        "drive": lambda: client.put_drive("data", rootfs, is_root_device=False, is_read_only=True),
        "machine_config": lambda: client.put_machine_config(1, 128),
        "network": lambda: client.put_network_interface("eth1", "tap1"),
        "vsock": lambda: client.put_vsock(4, short_dir / "other.sock"),
        "start": lambda: client.instance_start(),
        "load_snapshot": lambda: client.load_snapshot(short_dir / "snap", mem_file_path=short_dir / "mem"),
    }
    with pytest.raises(FirecrackerError) as raised:
        await calls[call]()
    assert raised.value.path == path
    assert raised.value.fault_message == POST_BOOT_ERROR


@pytest.mark.parametrize("call", ["pause", "resume", "ctrl_alt_del", "create_snapshot"])
async def test_post_boot_call_before_start(simulator: FirecrackerSimulator, client: FirecrackerClient,
                                           short_dir: Path, call: str) -> None:
    calls = {
        "pause": lambda: client.pause(),
        "resume": lambda: client.resume(),
        "ctrl_alt_del": lambda: client.send_ctrl_alt_del(),
        "create_snapshot": lambda: client.create_snapshot(short_dir / "snap", short_dir / "mem"),
    }
    with pytest.raises(FirecrackerError) as raised:
        await calls[call]()
    assert raised.value.fault_message == PRE_BOOT_ERROR


@pytest.mark.parametrize(
    ("method", "path", "body", "fault"),
    [
        ("PUT", "/boot-source", {"kernel_image_path": "/k", "kernel_args": "x"},
         "unknown field `kernel_args`, expected one of `kernel_image_path`, `initrd_path`, `boot_args`."),
        ("PUT", "/boot-source", {"boot_args": "x"}, "missing field `kernel_image_path`."),
        ("PUT", "/boot-source", {"kernel_image_path": 5}, "invalid type: integer `5`, expected a string."),
        ("PUT", "/boot-source", [], "invalid type: sequence, expected struct BootSourceConfig."),
        ("PUT", "/machine-config", {"vcpu_count": 300, "mem_size_mib": 128}, "invalid value: integer `300`, expected u8."),
        ("PUT", "/machine-config", {"vcpu_count": -1, "mem_size_mib": 128}, "invalid value: integer `-1`, expected u8."),
        ("PUT", "/machine-config", {"vcpu_count": 1.5, "mem_size_mib": 128}, "invalid type: floating point `1.5`, expected u8."),
        ("PUT", "/machine-config", {"vcpu_count": 1}, "missing field `mem_size_mib`."),
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "smt": "no"},
         "invalid type: string \"no\", expected a boolean."),
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "1G"},
         "unknown variant `1G`, expected one of `None`, `Transparent`, `2M`."),
        ("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/r", "is_read_only": False},
         "missing field `is_root_device`."),
        ("PUT", "/drives/rootfs", {"drive_id": "rootfs", "is_root_device": True, "is_read_only": False,
                                   "path_on_host": "/r", "readonly": True},
         "unknown field `readonly`, expected one of `drive_id`, `partuuid`, `is_root_device`, `cache_type`, "
         "`is_read_only`, `path_on_host`, `rate_limiter`, `io_engine`, `socket`."),
        ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v", "cid": 3},
         "unknown field `cid`, expected one of `vsock_id`, `guest_cid`, `uds_path`."),
        ("PUT", "/vsock", {"guest_cid": "3", "uds_path": "/v"}, "invalid type: string \"3\", expected u32."),
        ("PUT", "/actions", {"action_type": "Reboot"},
         "unknown variant `Reboot`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`."),
        ("PUT", "/actions", {}, "missing field `action_type`."),
        ("PATCH", "/vm", {"state": "Stopped"}, "unknown variant `Stopped`, expected `Paused` or `Resumed`."),
        ("PUT", "/snapshot/create", {"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Partial"},
         "unknown variant `Partial`, expected `Diff` or `Full`."),
        ("PUT", "/snapshot/load", {"snapshot_path": "/s"},
         "missing field: either `mem_backend` or `mem_file_path` is required."),
        ("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m",
                                   "mem_backend": {"backend_type": "File", "backend_path": "/m"}},
         "too many fields: either `mem_backend` or `mem_file_path` exclusively is required."),
        ("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_backend": {"backend_type": "Disk", "backend_path": "/m"}},
         "unknown variant `Disk`, expected `File` or `Uffd`."),
    ],
)
async def test_invalid_body_rejected(simulator: FirecrackerSimulator, method: str, path: str, body: Any, fault: str) -> None:
    response = await _raw(simulator, method, path, body)
    assert response.status_code == 400
    assert response.json()["fault_message"] == DESERIALIZE_PREFIX + fault


@pytest.mark.parametrize(
    ("method", "path", "body", "fault"),
    [
        ("PUT", "/drives/other", {"drive_id": "rootfs", "is_root_device": True}, "The id from the path does not match the id from the body!"),
        ("PUT", "/drives/bad-id", {"drive_id": "bad-id", "is_root_device": True},
         "API Resource IDs can only contain alphanumeric characters and underscores."),
        ("PUT", "/drives", {"drive_id": "rootfs", "is_root_device": True}, "The ID cannot be empty."),
        ("PUT", "/network-interfaces/eth0", {"iface_id": "eth1", "host_dev_name": "tap0"},
         "The id from the path does not match the id from the body!"),
        ("PUT", "/widgets", {"a": 1}, "Invalid request method and/or path: PUT widgets."),
        ("DELETE", "/vm", None, "Invalid request method and/or path: DELETE vm."),
        ("PUT", "/snapshot", {"snapshot_path": "/s"}, "Missing snapshot operation type."),
        ("PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": True}, "the Firecracker simulator does not implement PUT /balloon"),
    ],
)
async def test_invalid_request_rejected(simulator: FirecrackerSimulator, method: str, path: str, body: Any, fault: str) -> None:
    response = await _raw(simulator, method, path, body)
    assert response.status_code == 400
    assert response.json()["fault_message"] == fault


async def test_empty_put_and_get_with_body(simulator: FirecrackerSimulator) -> None:
    empty = await _raw(simulator, "PUT", "/boot-source", content=b"")
    assert empty.json()["fault_message"] == "Empty PUT request."
    get_with_body = await _raw(simulator, "GET", "/", content=b"{}")
    assert get_with_body.json()["fault_message"] == "GET request cannot have a body."
    invalid_json = await _raw(simulator, "PUT", "/boot-source", content=b"{not json")
    assert invalid_json.json()["fault_message"].startswith("An error occurred when deserializing the json body")


@pytest.mark.parametrize(
    ("vcpus", "memory", "smt", "fault"),
    [
        (0, 128, False, VCPU_COUNT_ERROR),
        (33, 128, False, VCPU_COUNT_ERROR),
        (3, 128, True, VCPU_COUNT_ERROR),
        (1, 0, False, MEMORY_SIZE_ERROR),
    ],
)
async def test_machine_config_limits(simulator: FirecrackerSimulator, client: FirecrackerClient,
                                     vcpus: int, memory: int, smt: bool, fault: str) -> None:
    with pytest.raises(FirecrackerError) as raised:
        await client.put_machine_config(vcpus, memory, smt=smt)
    assert raised.value.fault_message == fault


async def test_machine_config_smt_even_accepted(simulator: FirecrackerSimulator, client: FirecrackerClient) -> None:
    await client.put_machine_config(4, 512, smt=True)
    response = await _raw(simulator, "GET", "/machine-config")
    assert response.json()["vcpu_count"] == 4
    assert response.json()["smt"] is True


async def test_missing_kernel_rejected(simulator: FirecrackerSimulator, client: FirecrackerClient, short_dir: Path) -> None:
    with pytest.raises(FirecrackerError) as raised:
        await client.put_boot_source(short_dir / "missing-vmlinux")
    assert raised.value.fault_message.startswith("Boot source error: The kernel file cannot be opened")


async def test_missing_drive_file_rejected(simulator: FirecrackerSimulator, client: FirecrackerClient, short_dir: Path) -> None:
    with pytest.raises(FirecrackerError) as raised:
        await client.put_drive("rootfs", short_dir / "missing.ext4", is_root_device=True, is_read_only=False)
    assert str(raised.value).startswith("PUT /drives/rootfs failed: 400: Drive config error:")


async def test_second_root_drive_rejected(simulator: FirecrackerSimulator, client: FirecrackerClient,
                                          boot_files: tuple[Path, Path]) -> None:
    _, rootfs = boot_files
    await client.put_drive("rootfs", rootfs, is_root_device=True, is_read_only=False)
    # Replacing the same drive is allowed, but a second root drive is not.
    await client.put_drive("rootfs", rootfs, is_root_device=True, is_read_only=True)
    with pytest.raises(FirecrackerError) as raised:
        await client.put_drive("other", rootfs, is_root_device=True, is_read_only=False)
    assert raised.value.fault_message == "Drive config error: A root block device already exists!"


async def test_vsock_socket_in_use_rejected(simulator: FirecrackerSimulator, client: FirecrackerClient, short_dir: Path) -> None:
    (short_dir / "v.sock").write_text("taken")
    with pytest.raises(FirecrackerError) as raised:
        await client.put_vsock(3, short_dir / "v.sock")
    assert "Address in use" in raised.value.fault_message


async def test_unreachable_socket_reported(short_dir: Path) -> None:
    async with FirecrackerClient(short_dir / "missing.sock") as api:
        with pytest.raises(FirecrackerUnavailable, match="GET / failed: cannot reach the Firecracker API at"):
            await api.describe_instance()


async def test_invalid_config_rejected_before_calls(simulator: FirecrackerSimulator, client: FirecrackerClient,
                                                    boot_files: tuple[Path, Path], short_dir: Path) -> None:
    kernel, rootfs = boot_files
    bad_configs = [
        _config(boot_files, short_dir, vcpu_count=33),
        _config(boot_files, short_dir, vcpu_count=3, smt=True),
        _config(boot_files, short_dir, drives=(Drive("a", rootfs, True), Drive("b", rootfs, True))),
        _config(boot_files, short_dir, drives=(Drive("a", rootfs), Drive("a", rootfs))),
        _config(boot_files, short_dir, vsock=VsockDevice(2, short_dir / "v.sock")),
    ]
    for config in bad_configs:
        with pytest.raises(ValueError, match="invalid microVM configuration"):
            await FirecrackerVm(client).boot(config)
    assert simulator.calls() == []


async def test_load_snapshot_needs_one_memory_source(client: FirecrackerClient, short_dir: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of mem_file_path and mem_backend_path"):
        await client.load_snapshot(short_dir / "snap")
    with pytest.raises(ValueError, match="exactly one of mem_file_path and mem_backend_path"):
        await client.load_snapshot(short_dir / "snap", mem_file_path=short_dir / "m", mem_backend_path=short_dir / "m")


# --- snapshots --------------------------------------------------------------------------------


async def test_snapshot_create_needs_pause(simulator: FirecrackerSimulator, client: FirecrackerClient,
                                           boot_files: tuple[Path, Path], short_dir: Path) -> None:
    await _boot(client, boot_files, short_dir)
    with pytest.raises(FirecrackerError) as raised:
        await client.create_snapshot(short_dir / "vm.snap", short_dir / "vm.mem")
    assert raised.value.path == "/snapshot/create"
    assert "unavailable while running" in raised.value.fault_message
    assert not (short_dir / "vm.snap").exists()


async def test_snapshot_create_and_load(short_dir: Path, boot_files: tuple[Path, Path]) -> None:
    snapshot = short_dir / "vm.snap"
    memory = short_dir / "vm.mem"
    first = FirecrackerSimulator(short_dir / "first.sock", guest_services={ECHO_PORT: echo_service})
    await first.start()
    try:
        async with FirecrackerClient(first.api_socket_path) as api:
            await _boot(api, boot_files, short_dir)
            await api.pause()
            await api.create_snapshot(snapshot, memory)
            assert snapshot.exists()
            assert memory.exists()
            await api.resume()
            assert (await api.describe_instance())["state"] == "Running"
    finally:
        await first.close()
    assert first.calls()[-3:] == ["PUT /snapshot/create", "PATCH /vm", "GET /"]

    # A fresh process restores the VM, here with its vsock socket moved.
    second = FirecrackerSimulator(short_dir / "second.sock", guest_services={ECHO_PORT: echo_service})
    await second.start()
    try:
        async with FirecrackerClient(second.api_socket_path) as api:
            await api.load_snapshot(snapshot, mem_backend_path=memory, resume_vm=True, vsock_uds_path=short_dir / "moved.sock")
            assert (await api.describe_instance())["state"] == "Running"
            machine = (await _raw(second, "GET", "/machine-config")).json()
            assert machine["vcpu_count"] == 2
            assert machine["mem_size_mib"] == 256
            assert second.requests[0].body == {
                "snapshot_path": str(snapshot),
                "resume_vm": True,
                "mem_backend": {"backend_type": "File", "backend_path": str(memory)},
                "vsock_override": {"uds_path": str(short_dir / "moved.sock")},
            }
            reader, writer = await connect(short_dir / "moved.sock", ECHO_PORT)
            writer.write(b"restored")
            assert await asyncio.wait_for(reader.readexactly(8), 5) == b"restored"
            writer.close()
    finally:
        await second.close()


async def test_snapshot_load_paused_with_file(short_dir: Path, boot_files: tuple[Path, Path]) -> None:
    snapshot = short_dir / "vm.snap"
    memory = short_dir / "vm.mem"
    first = FirecrackerSimulator(short_dir / "first.sock")
    await first.start()
    try:
        async with FirecrackerClient(first.api_socket_path) as api:
            await FirecrackerVm(api).boot(_config(boot_files, short_dir, vsock=None))
            await api.pause()
            await api.create_snapshot(snapshot, memory, snapshot_type="Full")
    finally:
        await first.close()

    second = FirecrackerSimulator(short_dir / "second.sock")
    await second.start()
    try:
        async with FirecrackerClient(second.api_socket_path) as api:
            await api.load_snapshot(snapshot, mem_file_path=memory)
            assert (await api.describe_instance())["state"] == "Paused"
            await api.resume()
            assert (await api.describe_instance())["state"] == "Running"
    finally:
        await second.close()


async def test_snapshot_load_after_config_rejected(simulator: FirecrackerSimulator, client: FirecrackerClient,
                                                   boot_files: tuple[Path, Path], short_dir: Path) -> None:
    kernel, _ = boot_files
    await client.put_boot_source(kernel)
    with pytest.raises(FirecrackerError) as raised:
        await client.load_snapshot(short_dir / "vm.snap", mem_file_path=short_dir / "vm.mem")
    assert raised.value.fault_message == (
        "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."
    )


async def test_snapshot_load_missing_file(simulator: FirecrackerSimulator, client: FirecrackerClient, short_dir: Path) -> None:
    with pytest.raises(FirecrackerError) as raised:
        await client.load_snapshot(short_dir / "missing.snap", mem_file_path=short_dir / "missing.mem")
    assert raised.value.fault_message.startswith("Load snapshot error: Failed to restore from snapshot:")


# --- the runtime, with a fake firecracker binary ----------------------------------------------


FAKE_FIRECRACKER = """#!{python}
import sys
sys.path.insert(0, {tests_dir!r})
from firecracker_simulator import main
sys.exit(main())
"""


@pytest.fixture
def fake_firecracker(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a `firecracker` program that serves the simulator first on PATH."""
    bin_dir = short_dir / "bin"
    bin_dir.mkdir()
    program = bin_dir / "firecracker"
    program.write_text(FAKE_FIRECRACKER.format(python=sys.executable, tests_dir=str(TESTS_DIR)))
    program.chmod(program.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("FAKE_FIRECRACKER_EXIT_CODE", raising=False)
    monkeypatch.delenv("FAKE_FIRECRACKER_IGNORE_CTRL_ALT_DEL", raising=False)
    return program


class RuntimeSetup:
    def __init__(self, runtime: FirecrackerRuntime, plan: LaunchPlan, store: Store):
        self.runtime = runtime
        self.plan = plan
        self.store = store


def _plan(state_dir: Path, instance_id: str = "node-1-abc123", vm: dict[str, Any] | None = None,
          stop_grace_period: str = "5s") -> LaunchPlan:
    spec = Component.model_validate({
        "command": ["/usr/bin/node"],
        "runtime": "microvm",
        "vm": vm or {"vmm": "firecracker", "vcpus": 2, "memory": "256MiB"},
        "image": {"kind": "binary", "path": "/usr/bin/node"},
        "stop_grace_period": stop_grace_period,
    })
    instance_dir = state_dir / "instances" / instance_id
    return LaunchPlan(
        instance_id=instance_id,
        component="node",
        spec=spec,
        argv=["/usr/bin/node"],
        env={},
        instance_dir=instance_dir,
        data_dir=instance_dir / "data",
        log_path=state_dir / f"{instance_id}.log",
    )


@pytest.fixture
def runtime_setup(short_dir: Path, boot_files: tuple[Path, Path], fake_firecracker: Path) -> Iterator[RuntimeSetup]:
    kernel, rootfs = boot_files
    store = Store(short_dir / "state.db")

    async def images(plan: LaunchPlan) -> GuestImages:
        return GuestImages(kernel_image_path=kernel, rootfs_path=rootfs, boot_args=("init=/sbin/osvm-agent",))

    runtime = FirecrackerRuntime(short_dir, images, store=store)
    setup = RuntimeSetup(runtime, _plan(short_dir), store)
    yield setup
    _kill_fake_firecrackers(short_dir)
    store.close()


def _kill_fake_firecrackers(short_dir: Path) -> None:
    """Kill fake firecracker processes that a failed test left running."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command_line = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if str(short_dir).encode() in command_line and b"--api-sock" in command_line:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)


async def test_runtime_start_and_stop(runtime_setup: RuntimeSetup, short_dir: Path) -> None:
    runtime, plan = runtime_setup.runtime, runtime_setup.plan
    await runtime.prepare(plan)
    handle = await runtime.start(plan)
    try:
        assert procinfo.is_alive(handle.pid, handle.start_time)
        async with FirecrackerClient(plan.instance_dir / "firecracker.sock") as api:
            info = await api.describe_instance()
        assert info["state"] == "Running"
        assert info["id"] == plan.instance_id

        wait_task = asyncio.create_task(runtime.wait(handle, plan))
        await asyncio.sleep(0.1)
        assert not wait_task.done()
        await runtime.stop(handle, plan)
        status = await asyncio.wait_for(wait_task, 10)
    finally:
        await runtime.cleanup(plan)
    assert status.code == 0
    assert status.reason == "exited with status 0 (the guest shut down)"
    assert not procinfo.is_alive(handle.pid)
    assert not (plan.instance_dir / "firecracker.sock").exists()
    assert not (plan.instance_dir / "vsock.sock").exists()


async def test_runtime_vm_configuration(runtime_setup: RuntimeSetup, boot_files: tuple[Path, Path]) -> None:
    runtime, plan = runtime_setup.runtime, runtime_setup.plan
    kernel, rootfs = boot_files
    await runtime.prepare(plan)
    handle = await runtime.start(plan)
    try:
        async with FirecrackerClient(plan.instance_dir / "firecracker.sock") as api:
            machine = (await api._call("GET", "/machine-config")) or {}
        assert machine["vcpu_count"] == 2
        assert machine["mem_size_mib"] == 256
        reader, writer = await connect(runtime.vsock_path(plan), ECHO_PORT)
        writer.write(b"agent ping")
        assert await asyncio.wait_for(reader.readexactly(10), 5) == b"agent ping"
        writer.close()
        command_line = Path(f"/proc/{handle.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--api-sock" in command_line
        assert str(plan.instance_dir / "firecracker.sock").encode() in command_line
        assert plan.instance_id.encode() in command_line
    finally:
        await runtime.stop(handle, plan)
        await runtime.wait(handle, plan)
        await runtime.cleanup(plan)
    log = plan.log_path.read_text()
    assert "Running Firecracker simulator" in log


async def test_runtime_cid_allocated_and_released(runtime_setup: RuntimeSetup, short_dir: Path) -> None:
    runtime, plan, store = runtime_setup.runtime, runtime_setup.plan, runtime_setup.store
    other = _plan(short_dir, instance_id="node-1-def456")
    await runtime.prepare(plan)
    await runtime.prepare(other)
    assert store.allocations(kind="cid") == [("cid", "3", plan.instance_id), ("cid", "4", other.instance_id)]
    await runtime.cleanup(plan)
    await runtime.cleanup(other)
    assert store.allocations(kind="cid") == []


async def test_runtime_kills_after_grace(runtime_setup: RuntimeSetup, short_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_FIRECRACKER_IGNORE_CTRL_ALT_DEL", "1")
    runtime = runtime_setup.runtime
    plan = _plan(short_dir, stop_grace_period="500ms")
    await runtime.prepare(plan)
    handle = await runtime.start(plan)
    try:
        started = asyncio.get_running_loop().time()
        await runtime.stop(handle, plan)
        elapsed = asyncio.get_running_loop().time() - started
        status = await asyncio.wait_for(runtime.wait(handle, plan), 10)
    finally:
        await runtime.cleanup(plan)
    assert elapsed >= 0.5
    assert status.code == 128 + signal.SIGKILL
    assert status.reason == "killed by SIGKILL"


async def test_runtime_stop_resumes_paused_vm(runtime_setup: RuntimeSetup) -> None:
    runtime, plan = runtime_setup.runtime, runtime_setup.plan
    await runtime.prepare(plan)
    handle = await runtime.start(plan)
    try:
        async with FirecrackerClient(plan.instance_dir / "firecracker.sock") as api:
            await api.pause()
        await runtime.stop(handle, plan)
        status = await asyncio.wait_for(runtime.wait(handle, plan), 10)
    finally:
        await runtime.cleanup(plan)
    assert status.code == 0


async def test_runtime_missing_binary(short_dir: Path, boot_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    empty_bin = short_dir / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))

    async def images(plan: LaunchPlan) -> GuestImages:
        return GuestImages(kernel_image_path=boot_files[0])

    runtime = FirecrackerRuntime(short_dir, images)
    plan = _plan(short_dir)
    expected = 'firecracker binary not found on PATH: install Firecracker or use vmm = "qemu"'
    with pytest.raises(FirecrackerRuntimeError) as prepared:
        await runtime.prepare(plan)
    assert str(prepared.value) == expected
    with pytest.raises(FirecrackerRuntimeError) as started:
        await runtime.start(plan)
    assert str(started.value) == expected


async def test_runtime_process_exits_early(runtime_setup: RuntimeSetup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_FIRECRACKER_EXIT_CODE", "1")
    runtime, plan = runtime_setup.runtime, runtime_setup.plan
    await runtime.prepare(plan)
    with pytest.raises(FirecrackerRuntimeError) as raised:
        await runtime.start(plan)
    message = str(raised.value)
    assert message.startswith("firecracker exited with status 1 before its API socket was ready: ")
    assert "Firecracker simulator failing on purpose" in message
    assert str(plan.log_path) in message
    await runtime.cleanup(plan)


async def test_runtime_boot_rejected_kills_process(runtime_setup: RuntimeSetup, short_dir: Path) -> None:
    async def missing_kernel(plan: LaunchPlan) -> GuestImages:
        return GuestImages(kernel_image_path=short_dir / "no-such-vmlinux")

    runtime = FirecrackerRuntime(short_dir, missing_kernel)
    plan = runtime_setup.plan
    await runtime.prepare(plan)
    with pytest.raises(FirecrackerRuntimeError) as raised:
        await runtime.start(plan)
    message = str(raised.value)
    assert message.startswith(f"cannot boot the microVM of instance {plan.instance_id}: PUT /boot-source failed: 400: ")
    assert "The kernel file cannot be opened" in message
    command_lines = [
        Path(f"/proc/{entry}/cmdline").read_bytes() for entry in os.listdir("/proc")
        if entry.isdigit() and os.path.exists(f"/proc/{entry}/cmdline")
    ]
    assert not any(str(plan.instance_dir).encode() in line for line in command_lines), "firecracker left running"
    await runtime.cleanup(plan)


async def test_runtime_replaces_stale_sockets(runtime_setup: RuntimeSetup) -> None:
    runtime, plan = runtime_setup.runtime, runtime_setup.plan
    await runtime.prepare(plan)
    for name in ("firecracker.sock", "vsock.sock"):
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(plan.instance_dir / name))
        stale.close()
    handle = await runtime.start(plan)
    await runtime.stop(handle, plan)
    assert (await runtime.wait(handle, plan)).code == 0
    await runtime.cleanup(plan)


async def test_runtime_adopts_running_vm(runtime_setup: RuntimeSetup, short_dir: Path, boot_files: tuple[Path, Path]) -> None:
    first, plan = runtime_setup.runtime, runtime_setup.plan
    await first.prepare(plan)
    handle = await first.start(plan)

    async def images(plan: LaunchPlan) -> GuestImages:
        return GuestImages(kernel_image_path=boot_files[0])

    # A new daemon adopts the VM by pid and start time.
    second = FirecrackerRuntime(short_dir, images, store=runtime_setup.store)
    assert second.adopt(plan, os.getpid(), procinfo.start_time(os.getpid()) or 0) is None
    assert second.adopt(plan, handle.pid, handle.start_time + 1) is None
    adopted = second.adopt(plan, handle.pid, handle.start_time)
    assert adopted is not None
    assert adopted.adopted
    await second.stop(adopted, plan)
    status = await asyncio.wait_for(second.wait(adopted, plan), 10)
    assert status.code is None
    assert status.reason.startswith("exited (status unknown")
    # The first runtime still reaps its child.
    assert (await first.wait(handle, plan)).code == 0
    await second.cleanup(plan)
    await first.cleanup(plan)


async def test_runtime_too_many_vcpus(runtime_setup: RuntimeSetup, short_dir: Path) -> None:
    plan = _plan(short_dir, vm={"vmm": "firecracker", "vcpus": 48})
    with pytest.raises(FirecrackerRuntimeError, match="vm.vcpus = 48 is more than Firecracker supports: use at most 32"):
        await runtime_setup.runtime.prepare(plan)


async def test_runtime_exec_probe_fails_clearly(runtime_setup: RuntimeSetup) -> None:
    prefix = runtime_setup.runtime.exec_prefix(None, runtime_setup.plan)  # type: ignore[arg-type]
    result = subprocess.run([*prefix, "pg_isready"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "exec probes cannot run in a Firecracker microVM yet" in result.stderr


def test_uses_firecracker_selection() -> None:
    base = {"command": ["/x"], "image": {"kind": "binary", "path": "/x"}}
    firecracker = Component.model_validate({**base, "runtime": "microvm", "vm": {"vmm": "firecracker"}})
    qemu = Component.model_validate({**base, "runtime": "microvm", "vm": {"vmm": "qemu"}})
    default_vm = Component.model_validate({**base, "runtime": "microvm"})
    process = Component.model_validate({"command": ["/x"]})
    assert uses_firecracker(firecracker)
    assert not uses_firecracker(qemu)
    assert not uses_firecracker(default_vm)
    assert not uses_firecracker(process)
    assert FirecrackerRuntime.name == "microvm"
