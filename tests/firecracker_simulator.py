"""A simulator of Firecracker's HTTP API on a Unix socket, for testing osvm's Firecracker driver.

No Firecracker binary exists on the test machines, so the driver is tested against this simulator.
It was written from Firecracker's published API: the swagger file
src/firecracker/swagger/firecracker.yaml (API version 1.17.0-dev) and the request parsing and
error types in the Firecracker source (commit 81b38b9d of firecracker-microvm/firecracker). It
simulates:

- request bodies checked like Firecracker's serde structs with deny_unknown_fields: required
  fields, JSON types, integer ranges, enum values and unknown fields;
- call order: pre-boot calls after InstanceStart and post-boot calls before it fail, InstanceStart
  needs a boot source, snapshot/load only on a fresh process, snapshot/create only when Paused;
- the state in GET / (Not started, Running, Paused) and SendCtrlAltDel ending the process;
- errors as HTTP 400 with {"fault_message": "..."}, with Firecracker's message texts.

Differences from Firecracker, which tests must not rely on:

- serde's " at line L column C" suffix is left out of deserialization errors;
- fault messages that the source composes from nested error types (drive, tap device, snapshot
  create and load errors) were never observed from a real Firecracker, and three use the
  simulator's own wording: an invalid guest_mac, a guest_cid below 3 and a busy tap device;
- no guest runs. The vsock device is osvm's own HybridVsockMux joined to a GuestMux that serves
  `guest_services`, so the hybrid vsock contract reaches a fake guest, but Firecracker's own vsock
  muxer is not simulated;
- snapshot files are small JSON files of the simulator, not Firecracker's format;
- balloon, MMDS, logger, metrics, CPU templates, entropy, serial, pmem and hotplug are not
  simulated and respond with 400 saying so;
- PUT /drives and PUT /network-interfaces after boot fail as pre-boot-only calls, as in Firecracker
  releases without PCI hotplug; the commit above accepts them as hotplug when PCI is enabled.

Run as a program (see main()), it stands in for the `firecracker` binary in runtime tests.
"""

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from osvm.vsock import GuestMux, HybridVsockMux

VMM_VERSION = "1.17.0-dev"
DEFAULT_INSTANCE_ID = "anonymous-instance"
NOT_STARTED = "Not started"
RUNNING = "Running"
PAUSED = "Paused"
# Firecracker's MAX_SUPPORTED_VCPUS.
MAX_VCPUS = 32

POST_BOOT_ERROR = "The requested operation is not supported after starting the microVM."
PRE_BOOT_ERROR = "The requested operation is not supported before starting the microVM."
DESERIALIZE_PREFIX = "An error occurred when deserializing the json body of a request: "
VCPU_COUNT_ERROR = (
    f"Machine config error: The number of vCPUs must be greater than 0, less than {MAX_VCPUS} and must be 1 "
    f"or an even number if SMT is enabled."
)
MEMORY_SIZE_ERROR = "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size."

GuestService = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --- request body schemas, from Firecracker's serde structs -----------------------------------


@dataclass(frozen=True)
class Kind:
    """The JSON type that one field accepts, as serde would deserialize it."""

    name: str
    bits: int = 0
    variants: tuple[str, ...] = ()
    struct: "Struct | None" = None


STRING = Kind("string")
BOOL = Kind("bool")
ANY_OBJECT = Kind("object")


def unsigned(bits: int) -> Kind:
    return Kind("uint", bits=bits)


def enum(*variants: str) -> Kind:
    return Kind("enum", variants=variants)


def nested(struct: "Struct") -> Kind:
    return Kind("struct", struct=struct)


def list_of(struct: "Struct") -> Kind:
    return Kind("list", struct=struct)


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    # Required fields are those that are neither Option nor #[serde(default)] in Firecracker.
    required: bool = False
    # Option<T> fields also accept null.
    nullable: bool = True


@dataclass(frozen=True)
class Struct:
    name: str
    fields: tuple[Field, ...]
    deny_unknown_fields: bool = True


BOOT_SOURCE = Struct("BootSourceConfig", (
    Field("kernel_image_path", STRING, required=True, nullable=False),
    Field("initrd_path", STRING),
    Field("boot_args", STRING),
))
RATE_LIMITER = ANY_OBJECT
DRIVE = Struct("BlockDeviceConfig", (
    Field("drive_id", STRING, required=True, nullable=False),
    Field("partuuid", STRING),
    Field("is_root_device", BOOL, required=True, nullable=False),
    Field("cache_type", enum("Unsafe", "Writeback"), nullable=False),
    Field("is_read_only", BOOL),
    Field("path_on_host", STRING),
    Field("rate_limiter", RATE_LIMITER),
    Field("io_engine", enum("Sync", "Async")),
    Field("socket", STRING),
))
MACHINE_CONFIG = Struct("MachineConfig", (
    Field("vcpu_count", unsigned(8), required=True, nullable=False),
    Field("mem_size_mib", unsigned(64), required=True, nullable=False),
    Field("smt", BOOL, nullable=False),
    Field("cpu_template", enum("C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None")),
    Field("track_dirty_pages", BOOL, nullable=False),
    Field("huge_pages", enum("None", "Transparent", "2M"), nullable=False),
))
NETWORK_INTERFACE = Struct("NetworkInterfaceConfig", (
    Field("iface_id", STRING, required=True, nullable=False),
    Field("host_dev_name", STRING, required=True, nullable=False),
    Field("guest_mac", STRING),
    Field("mtu", unsigned(16)),
    Field("rx_rate_limiter", RATE_LIMITER),
    Field("tx_rate_limiter", RATE_LIMITER),
))
VSOCK = Struct("VsockDeviceConfig", (
    Field("vsock_id", STRING),
    Field("guest_cid", unsigned(32), required=True, nullable=False),
    Field("uds_path", STRING, required=True, nullable=False),
))
ACTION = Struct("ActionBody", (
    Field("action_type", enum("FlushMetrics", "InstanceStart", "SendCtrlAltDel"), required=True, nullable=False),
))
SNAPSHOT_CREATE = Struct("CreateSnapshotParams", (
    Field("snapshot_type", enum("Diff", "Full"), nullable=False),
    Field("snapshot_path", STRING, required=True, nullable=False),
    Field("mem_file_path", STRING, required=True, nullable=False),
))
MEM_BACKEND = Struct("MemBackendConfig", (
    Field("backend_path", STRING, required=True, nullable=False),
    Field("backend_type", enum("File", "Uffd"), required=True, nullable=False),
))
# NetworkOverride and VsockOverride have no deny_unknown_fields in Firecracker.
NETWORK_OVERRIDE = Struct("NetworkOverride", (
    Field("iface_id", STRING, required=True, nullable=False),
    Field("host_dev_name", STRING, required=True, nullable=False),
), deny_unknown_fields=False)
VSOCK_OVERRIDE = Struct("VsockOverride", (
    Field("uds_path", STRING, required=True, nullable=False),
), deny_unknown_fields=False)
SNAPSHOT_LOAD = Struct("LoadSnapshotConfig", (
    Field("snapshot_path", STRING, required=True, nullable=False),
    Field("mem_file_path", STRING),
    Field("mem_backend", nested(MEM_BACKEND)),
    Field("enable_diff_snapshots", BOOL, nullable=False),
    Field("track_dirty_pages", BOOL, nullable=False),
    Field("resume_vm", BOOL, nullable=False),
    Field("network_overrides", list_of(NETWORK_OVERRIDE), nullable=False),
    Field("vsock_override", nested(VSOCK_OVERRIDE)),
    Field("clock_realtime", BOOL, nullable=False),
    Field("huge_pages", enum("Snapshot", "None", "Transparent", "2M"), nullable=False),
))
VM_STATE = Struct("Vm", (
    Field("state", enum("Paused", "Resumed"), required=True, nullable=False),
))


class DeserializeError(ValueError):
    """A body that Firecracker's serde deserialization would reject; the message is serde's."""


def deserialize(value: Any, struct: Struct) -> dict[str, Any]:
    """Check a JSON value against a struct the way serde does, and return the fields present."""
    if not isinstance(value, dict):
        raise DeserializeError(f"invalid type: {_describe(value)}, expected struct {struct.name}")
    known = {item.name: item for item in struct.fields}
    for key in value:
        if key not in known and struct.deny_unknown_fields:
            raise DeserializeError(f"unknown field `{key}`, {_expected_one_of([item.name for item in struct.fields])}")
    for item in struct.fields:
        if item.name not in value:
            if item.required:
                raise DeserializeError(f"missing field `{item.name}`")
            continue
        _check_value(value[item.name], item)
    return {key: item for key, item in value.items() if key in known}


def _check_value(value: Any, item: Field) -> None:
    if value is None:
        if item.nullable:
            return
        raise DeserializeError(f"invalid type: null, expected {_expected(item.kind)}")
    kind = item.kind
    if kind.name == "string" and not isinstance(value, str):
        raise DeserializeError(f"invalid type: {_describe(value)}, expected a string")
    if kind.name == "bool" and not isinstance(value, bool):
        raise DeserializeError(f"invalid type: {_describe(value)}, expected a boolean")
    if kind.name == "uint":
        if isinstance(value, bool) or not isinstance(value, int):
            raise DeserializeError(f"invalid type: {_describe(value)}, expected {_expected(kind)}")
        if not 0 <= value < 1 << kind.bits:
            raise DeserializeError(f"invalid value: integer `{value}`, expected {_expected(kind)}")
    if kind.name == "enum":
        if not isinstance(value, str):
            raise DeserializeError(f"invalid type: {_describe(value)}, expected variant identifier")
        if value not in kind.variants:
            raise DeserializeError(f"unknown variant `{value}`, {_expected_one_of(list(kind.variants))}")
    if kind.name == "object" and not isinstance(value, dict):
        raise DeserializeError(f"invalid type: {_describe(value)}, expected struct RateLimiterConfig")
    if kind.name == "struct":
        assert kind.struct is not None
        deserialize(value, kind.struct)
    if kind.name == "list":
        assert kind.struct is not None
        if not isinstance(value, list):
            raise DeserializeError(f"invalid type: {_describe(value)}, expected a sequence")
        for element in value:
            deserialize(element, kind.struct)


def _expected(kind: Kind) -> str:
    if kind.name == "uint":
        return {8: "u8", 16: "u16", 32: "u32", 64: "usize"}[kind.bits]
    return {"string": "a string", "bool": "a boolean", "enum": "variant identifier"}.get(kind.name, kind.name)


def _expected_one_of(names: list[str]) -> str:
    """Format an expected-names list the way serde's OneOf does."""
    quoted = [f"`{name}`" for name in names]
    if not quoted:
        return "there are no fields"
    if len(quoted) == 1:
        return f"expected {quoted[0]}"
    if len(quoted) == 2:
        return f"expected {quoted[0]} or {quoted[1]}"
    return "expected one of " + ", ".join(quoted)


def _describe(value: Any) -> str:
    """Describe an unexpected JSON value the way serde's Unexpected does."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if isinstance(value, list):
        return "sequence"
    return "map"


def _check_id(resource_id: str | None) -> str:
    """Apply Firecracker's checked_id() to a resource id taken from the request path."""
    if not resource_id:
        raise ApiFault("The ID cannot be empty.")
    if not all(character == "_" or character.isalnum() for character in resource_id):
        raise ApiFault("API Resource IDs can only contain alphanumeric characters and underscores.")
    return resource_id


# --- the simulated VMM ------------------------------------------------------------------------


class ApiFault(Exception):
    """A request that Firecracker rejects with 400 and this fault message."""


@dataclass
class ApiRequest:
    method: str
    path: str
    body: Any
    status: int


@dataclass
class VmResources:
    boot_source: dict[str, Any] | None = None
    drives: dict[str, dict[str, Any]] = field(default_factory=dict)
    machine_config: dict[str, Any] = field(
        default_factory=lambda: {"vcpu_count": 1, "mem_size_mib": 128, "smt": False, "track_dirty_pages": False,
                                 "huge_pages": "None"}
    )
    network_interfaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    vsock: dict[str, Any] | None = None


class FirecrackerSimulator:
    """Firecracker's API on `api_socket_path`, with the state of one simulated microVM."""

    def __init__(
        self,
        api_socket_path: str | os.PathLike[str],
        instance_id: str = DEFAULT_INSTANCE_ID,
        guest_services: dict[int, GuestService] | None = None,
        ignore_ctrl_alt_del: bool = False,
    ):
        self.api_socket_path = os.fspath(api_socket_path)
        self.instance_id = instance_id
        self.guest_services = dict(guest_services or {})
        # A guest without an i8042 keyboard driver ignores Ctrl+Alt+Del and keeps running.
        self.ignore_ctrl_alt_del = ignore_ctrl_alt_del
        self.state = NOT_STARTED
        self.resources = VmResources()
        # Firecracker rejects snapshot/load once a boot-specific resource was configured.
        self.boot_path = False
        self.requests: list[ApiRequest] = []
        # Set when the guest has acted on Ctrl+Alt+Del, after which Firecracker exits.
        self.shutdown = asyncio.Event()
        self._ctrl_alt_del_pending = False
        self._runner: web.AppRunner | None = None
        self._vsock_mux: HybridVsockMux | None = None
        self._guest_mux: GuestMux | None = None
        self._guest_stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    # --- server ------------------------------------------------------------------------------

    async def start(self) -> None:
        if os.path.exists(self.api_socket_path):
            raise OSError(98, f"Failed to bind the API socket {self.api_socket_path}: Address in use (os error 98)")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, self.api_socket_path).start()

    async def close(self) -> None:
        await self._close_vsock()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.api_socket_path)

    def calls(self) -> list[str]:
        """Return "METHOD /path" of every request so far, in order."""
        return [f"{request.method} {request.path}" for request in self.requests]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body: Any = None
        status = 400
        try:
            if raw:
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError as error:
                    raise ApiFault(f"{DESERIALIZE_PREFIX}{error.msg} at line {error.lineno} column {error.colno}.") from None
            result = await self._dispatch(request.method, request.path, body, bool(raw))
            status = 200 if result is not None else 204
            if result is None:
                return web.Response(status=204)
            return web.json_response(result, status=200)
        except ApiFault as fault:
            return web.json_response({"fault_message": str(fault)}, status=400)
        except DeserializeError as error:
            status = 400
            return web.json_response({"fault_message": f"{DESERIALIZE_PREFIX}{error}."}, status=400)
        finally:
            self.requests.append(ApiRequest(request.method, request.path, body, status))

    async def _dispatch(self, method: str, path: str, body: Any, has_body: bool) -> dict[str, Any] | None:
        """Route a request the way Firecracker's ParsedRequest::try_from does."""
        tokens = path.lstrip("/").split("/")
        resource = tokens[0]
        resource_id = tokens[1] if len(tokens) > 1 and tokens[1] else None
        if method == "GET":
            if has_body:
                raise ApiFault("GET request cannot have a body.")
            if resource == "":
                return self._instance_info()
            if resource == "version":
                return {"firecracker_version": VMM_VERSION}
            if resource == "machine-config":
                return dict(self.resources.machine_config)
        elif method == "PUT":
            if not has_body:
                raise ApiFault("Empty PUT request.")
            handlers = {
                "actions": self._put_action,
                "boot-source": self._put_boot_source,
                "machine-config": self._put_machine_config,
                "vsock": self._put_vsock,
            }
            if resource in handlers:
                return await handlers[resource](body)
            if resource == "drives":
                return self._put_drive(body, resource_id)
            if resource == "network-interfaces":
                return self._put_network_interface(body, resource_id)
            if resource == "snapshot":
                return await self._put_snapshot(body, resource_id)
        elif method == "PATCH":
            if not has_body:
                raise ApiFault("Empty PATCH request.")
            if resource == "vm" and resource_id is None:
                return self._patch_vm(body)
        if resource in ("balloon", "cpu-config", "logger", "metrics", "mmds", "entropy", "serial", "hotplug", "pmem"):
            raise ApiFault(f"the Firecracker simulator does not implement {method} {path}")
        if resource == "vm" and resource_id == "config":
            raise ApiFault(f"the Firecracker simulator does not implement {method} {path}")
        raise ApiFault(f"Invalid request method and/or path: {method} {resource}.")

    # --- pre-boot configuration --------------------------------------------------------------

    def _require_pre_boot(self) -> None:
        if self.state != NOT_STARTED:
            raise ApiFault(POST_BOOT_ERROR)

    def _require_post_boot(self) -> None:
        if self.state == NOT_STARTED:
            raise ApiFault(PRE_BOOT_ERROR)

    async def _put_boot_source(self, body: Any) -> None:
        config = deserialize(body, BOOT_SOURCE)
        self._require_pre_boot()
        self.boot_path = True
        kernel = config["kernel_image_path"]
        if not os.path.exists(kernel):
            raise ApiFault("Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)")
        initrd = config.get("initrd_path")
        if initrd is not None and not os.path.exists(initrd):
            raise ApiFault(
                "Boot source error: The initrd file cannot be opened due to invalid path or invalid permissions. "
                "No such file or directory (os error 2)"
            )
        self.resources.boot_source = config

    def _put_drive(self, body: Any, resource_id: str | None) -> None:
        drive_id = _check_id(resource_id)
        config = deserialize(body, DRIVE)
        if drive_id != config["drive_id"]:
            raise ApiFault("The id from the path does not match the id from the body!")
        self._require_pre_boot()
        self.boot_path = True
        if config.get("socket") is None:
            # Composed from DriveError and VirtioBlockError.
            if config.get("path_on_host") is None or config.get("is_read_only") is None:
                raise ApiFault("Drive config error: Unable to create the virtio block device: Invalid block config.")
            if not os.path.exists(config["path_on_host"]):
                raise ApiFault(
                    "Drive config error: Unable to create the virtio block device: Virtio backend error: "
                    f"Error manipulating the backing file: No such file or directory (os error 2) {config['path_on_host']}"
                )
        if config["is_root_device"]:
            for other_id, other in self.resources.drives.items():
                if other["is_root_device"] and other_id != drive_id:
                    raise ApiFault("Drive config error: A root block device already exists!")
        self.resources.drives[drive_id] = config

    async def _put_machine_config(self, body: Any) -> None:
        config = deserialize(body, MACHINE_CONFIG)
        self._require_pre_boot()
        self.boot_path = True
        vcpus = config["vcpu_count"]
        smt = bool(config.get("smt", False))
        if vcpus == 0 or vcpus > MAX_VCPUS or (smt and vcpus > 1 and vcpus % 2 == 1):
            raise ApiFault(VCPU_COUNT_ERROR)
        memory = config["mem_size_mib"]
        if memory == 0 or (config.get("huge_pages") == "2M" and memory % 2 == 1):
            raise ApiFault(MEMORY_SIZE_ERROR)
        # Optional fields that are absent go back to their defaults, as the swagger file describes.
        self.resources.machine_config = {
            "vcpu_count": vcpus,
            "mem_size_mib": memory,
            "smt": smt,
            "track_dirty_pages": bool(config.get("track_dirty_pages", False)),
            "huge_pages": config.get("huge_pages", "None"),
        }

    def _put_network_interface(self, body: Any, resource_id: str | None) -> None:
        iface_id = _check_id(resource_id)
        config = deserialize(body, NETWORK_INTERFACE)
        if iface_id != config["iface_id"]:
            raise ApiFault("The id from the path does not match the id from the body!")
        self._require_pre_boot()
        self.boot_path = True
        mac = config.get("guest_mac")
        if mac is not None and not _is_mac_address(mac):
            # Firecracker rejects the MAC while deserializing, with other wording.
            raise DeserializeError(f"invalid MAC address {json.dumps(mac)}")
        for other_id, other in self.resources.network_interfaces.items():
            if other_id != iface_id and other["host_dev_name"] == config["host_dev_name"]:
                # Composed from NetworkInterfaceError. The simulator cannot open a tap device, so
                # it checks only that two interfaces do not share one.
                raise ApiFault(
                    f"Could not create the network device: Open tap device failed: Error while creating ifreq "
                    f"structure: Resource busy (os error 16). Invalid TUN/TAP Backend provided by "
                    f"{config['host_dev_name']}. Check our documentation on setting up the network devices."
                )
        self.resources.network_interfaces[iface_id] = config

    async def _put_vsock(self, body: Any) -> None:
        config = deserialize(body, VSOCK)
        self._require_pre_boot()
        self.boot_path = True
        # The swagger file sets minimum 3 for guest_cid. The message is the simulator's.
        if config["guest_cid"] < 3:
            raise ApiFault(f"Vsock config error: invalid guest_cid {config['guest_cid']}: the minimum is 3")
        await self._close_vsock()
        await self._bind_vsock(config["uds_path"])
        self.resources.vsock = config

    async def _bind_vsock(self, uds_path: str) -> None:
        """Listen on uds_path, as Firecracker binds the vsock socket when the device is configured."""
        if os.path.exists(uds_path):
            raise ApiFault(
                "Vsock config error: Cannot create backend for vsock device: Error binding to the host-side "
                "Unix socket: Address in use (os error 98)"
            )
        host_end, guest_end = socket.socketpair()
        host_reader, host_writer = await asyncio.open_connection(sock=host_end)
        self._guest_stream = await asyncio.open_connection(sock=guest_end)
        self._vsock_mux = HybridVsockMux(uds_path, host_reader, host_writer)
        await self._vsock_mux.start()

    async def _boot_guest(self) -> None:
        """Start the fake guest's side of the vsock device, with the guest services listening."""
        if self._guest_stream is None or self._guest_mux is not None:
            return
        self._guest_mux = GuestMux(*self._guest_stream)
        for port, service in self.guest_services.items():
            self._guest_mux.listen(port, service)
        await self._guest_mux.start()

    async def _close_vsock(self) -> None:
        if self._guest_mux is not None:
            await self._guest_mux.close()
            self._guest_mux = None
        elif self._guest_stream is not None:
            self._guest_stream[1].close()
        self._guest_stream = None
        if self._vsock_mux is not None:
            await self._vsock_mux.close()
            self._vsock_mux = None

    # --- actions and runtime state -----------------------------------------------------------

    async def _put_action(self, body: Any) -> None:
        action = deserialize(body, ACTION)["action_type"]
        if action == "InstanceStart":
            self._require_pre_boot()
            if self.resources.boot_source is None:
                raise ApiFault("Start microvm error: Cannot start microvm without kernel configuration.")
            self.state = RUNNING
            await self._boot_guest()
            return
        self._require_post_boot()
        if action == "SendCtrlAltDel":
            self._ctrl_alt_del_pending = True
            self._act_on_ctrl_alt_del()
            return
        raise ApiFault("the Firecracker simulator does not implement FlushMetrics")

    def _act_on_ctrl_alt_del(self) -> None:
        """Let the guest shut down after Ctrl+Alt+Del once it runs, which makes Firecracker exit."""
        if self._ctrl_alt_del_pending and self.state == RUNNING and not self.ignore_ctrl_alt_del:
            self._ctrl_alt_del_pending = False
            # A real guest takes a moment to shut down after the keystroke.
            asyncio.get_running_loop().call_later(0.05, self.shutdown.set)

    def _patch_vm(self, body: Any) -> None:
        state = deserialize(body, VM_STATE)["state"]
        self._require_post_boot()
        self.state = PAUSED if state == "Paused" else RUNNING
        self._act_on_ctrl_alt_del()

    def _instance_info(self) -> dict[str, Any]:
        return {"id": self.instance_id, "state": self.state, "vmm_version": VMM_VERSION, "app_name": "Firecracker"}

    # --- snapshots ---------------------------------------------------------------------------

    async def _put_snapshot(self, body: Any, operation: str | None) -> None:
        if operation is None:
            raise ApiFault("Missing snapshot operation type.")
        if operation == "create":
            self._create_snapshot(deserialize(body, SNAPSHOT_CREATE))
            return
        if operation == "load":
            await self._load_snapshot(deserialize(body, SNAPSHOT_LOAD))
            return
        raise ApiFault(f"Invalid request method and/or path: PUT /snapshot/{operation}.")

    def _create_snapshot(self, params: dict[str, Any]) -> None:
        self._require_post_boot()
        if self.state != PAUSED:
            # Composed from CreateSnapshotError and the vCPU's NotAllowed response.
            raise ApiFault(
                "Create snapshot error: Cannot save the microVM state: Operation not allowed: "
                "save/restore unavailable while running"
            )
        snapshot = {
            "simulated_firecracker_snapshot": 1,
            "snapshot_type": params.get("snapshot_type", "Full"),
            "machine_config": self.resources.machine_config,
            "drives": self.resources.drives,
            "network_interfaces": self.resources.network_interfaces,
            "vsock": self.resources.vsock,
        }
        try:
            Path(params["snapshot_path"]).write_text(json.dumps(snapshot))
            Path(params["mem_file_path"]).write_bytes(b"simulated guest memory\n")
        except OSError as error:
            raise ApiFault(
                f"Create snapshot error: Cannot perform open on the snapshot backing file: {error.strerror} "
                f"(os error {error.errno})"
            ) from None

    async def _load_snapshot(self, params: dict[str, Any]) -> None:
        has_file = params.get("mem_file_path") is not None
        has_backend = params.get("mem_backend") is not None
        if has_file and has_backend:
            raise DeserializeError("too many fields: either `mem_backend` or `mem_file_path` exclusively is required")
        if not has_file and not has_backend:
            raise DeserializeError("missing field: either `mem_backend` or `mem_file_path` is required")

        self._require_pre_boot()
        if self.boot_path:
            raise ApiFault(
                "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."
            )

        memory_path = params["mem_file_path"] if has_file else params["mem_backend"]["backend_path"]
        try:
            snapshot = json.loads(Path(params["snapshot_path"]).read_text())
            if snapshot.get("simulated_firecracker_snapshot") != 1:
                raise ValueError("not a snapshot of the Firecracker simulator")
            if has_file or params["mem_backend"]["backend_type"] == "File":
                Path(memory_path).stat()
        except (OSError, ValueError) as error:
            # Composed from LoadSnapshotError.
            raise ApiFault(f"Load snapshot error: Failed to restore from snapshot: {error}") from None

        self.resources.machine_config = snapshot["machine_config"]
        self.resources.drives = snapshot["drives"]
        self.resources.network_interfaces = snapshot["network_interfaces"]
        vsock = snapshot["vsock"]
        if vsock is not None:
            override = params.get("vsock_override")
            if override is not None:
                vsock = {**vsock, "uds_path": override["uds_path"]}
            await self._bind_vsock(vsock["uds_path"])
            self.resources.vsock = vsock
        self.state = RUNNING if params.get("resume_vm") else PAUSED
        await self._boot_guest()


def _is_mac_address(text: str) -> bool:
    parts = text.split(":")
    return len(parts) == 6 and all(len(part) == 2 and all(c in "0123456789abcdefABCDEF" for c in part) for part in parts)


# --- the fake `firecracker` program -----------------------------------------------------------


async def echo_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo every byte back until EOF. The fake guest serves this on vsock port 5000."""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    writer.close()


async def _run(api_socket: str, instance_id: str) -> int:
    ignore = os.environ.get("FAKE_FIRECRACKER_IGNORE_CTRL_ALT_DEL") == "1"
    simulator = FirecrackerSimulator(api_socket, instance_id, {5000: echo_service}, ignore_ctrl_alt_del=ignore)
    try:
        await simulator.start()
    except OSError as error:
        print(f"Failed to open the API socket: {error}", file=sys.stderr)
        return 1
    print(f"Running Firecracker simulator v{VMM_VERSION} on {api_socket}", flush=True)
    try:
        await simulator.shutdown.wait()
    finally:
        await simulator.close()
    print("Firecracker simulator exiting after the guest shut down", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand in for `firecracker --api-sock PATH [--id ID]`, exiting 0 once the guest shuts down.

    FAKE_FIRECRACKER_EXIT_CODE=N makes it exit with N before opening the API socket, and
    FAKE_FIRECRACKER_IGNORE_CTRL_ALT_DEL=1 makes the guest ignore Ctrl+Alt+Del, so only a signal
    ends the process.
    """
    parser = argparse.ArgumentParser(prog="firecracker")
    parser.add_argument("--api-sock", required=True)
    parser.add_argument("--id", default=DEFAULT_INSTANCE_ID)
    arguments = parser.parse_args(argv)
    early_exit = os.environ.get("FAKE_FIRECRACKER_EXIT_CODE")
    if early_exit:
        print("Firecracker simulator failing on purpose", file=sys.stderr)
        return int(early_exit)
    return asyncio.run(_run(arguments.api_sock, arguments.id))


if __name__ == "__main__":
    sys.exit(main())
