"""An async client of Firecracker's HTTP API on its Unix socket.

Paths and field names follow Firecracker's swagger file, src/firecracker/swagger/firecracker.yaml
(API version 1.17.0-dev). Successful calls return 204 No Content, and GET calls return JSON.
Firecracker responds to a rejected call with a 4xx status and {"fault_message": "..."}, which this
client raises as FirecrackerError.

NOTE: this client has been tested only against tests/firecracker_simulator.py, which was written
from the published API, and never against a real Firecracker.
"""

import json
import os
from typing import Any, Literal
from urllib.parse import quote

import httpx

# Maximum time for one API call, in seconds. Snapshot calls write the whole guest memory to disk,
# so they take far longer than configuration calls.
DEFAULT_TIMEOUT = 30.0

SnapshotType = Literal["Full", "Diff"]
MemoryBackendType = Literal["File", "Uffd"]


class FirecrackerError(Exception):
    """Firecracker rejected an API call; the message is "<METHOD> <path> failed: <status>: <fault_message>"."""

    def __init__(self, method: str, path: str, status: int, fault_message: str):
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message
        super().__init__(f"{method} {path} failed: {status}: {fault_message}")


class FirecrackerUnavailable(Exception):
    """The API socket could not be reached, or the connection broke before a response."""


class FirecrackerClient:
    """Call Firecracker's API on `api_socket_path`. Use it with `async with`, or call aclose()."""

    def __init__(self, api_socket_path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT):
        self.api_socket_path = os.fspath(api_socket_path)
        # Firecracker ignores the host name, but HTTP needs one.
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=self.api_socket_path),
            base_url="http://localhost",
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "FirecrackerClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- pre-boot configuration --------------------------------------------------------------

    async def put_boot_source(
        self, kernel_image_path: str | os.PathLike[str], boot_args: str | None = None,
        initrd_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Set the guest kernel, its command line and an optional initrd (PUT /boot-source)."""
        body: dict[str, Any] = {"kernel_image_path": os.fspath(kernel_image_path)}
        if boot_args is not None:
            body["boot_args"] = boot_args
        if initrd_path is not None:
            body["initrd_path"] = os.fspath(initrd_path)
        await self._call("PUT", "/boot-source", body)

    async def put_drive(
        self, drive_id: str, path_on_host: str | os.PathLike[str], is_root_device: bool, is_read_only: bool,
        partuuid: str | None = None,
    ) -> None:
        """Add or replace a virtio-block drive backed by a host file (PUT /drives/{drive_id})."""
        body: dict[str, Any] = {
            "drive_id": drive_id,
            "path_on_host": os.fspath(path_on_host),
            "is_root_device": is_root_device,
            "is_read_only": is_read_only,
        }
        if partuuid is not None:
            body["partuuid"] = partuuid
        await self._call("PUT", f"/drives/{quote(drive_id, safe='')}", body)

    async def put_machine_config(
        self, vcpu_count: int, mem_size_mib: int, smt: bool = False, track_dirty_pages: bool = False
    ) -> None:
        """Set the vCPU count, memory size in MiB, SMT and dirty page tracking (PUT /machine-config).

        Firecracker accepts 1 to 32 vCPUs, and with SMT only 1 or an even count.
        """
        body = {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib, "smt": smt, "track_dirty_pages": track_dirty_pages}
        await self._call("PUT", "/machine-config", body)

    async def put_network_interface(self, iface_id: str, host_dev_name: str, guest_mac: str | None = None) -> None:
        """Add a virtio-net interface backed by the host tap device `host_dev_name` (PUT /network-interfaces/{iface_id})."""
        body: dict[str, Any] = {"iface_id": iface_id, "host_dev_name": host_dev_name}
        if guest_mac is not None:
            body["guest_mac"] = guest_mac
        await self._call("PUT", f"/network-interfaces/{quote(iface_id, safe='')}", body)

    async def put_vsock(self, guest_cid: int, uds_path: str | os.PathLike[str], vsock_id: str | None = None) -> None:
        """Add the vsock device with its guest CID and host Unix socket (PUT /vsock).

        Firecracker binds `uds_path` for host-initiated connections and expects host programs on
        `<uds_path>_<port>` for guest-initiated ones. vsock_id is deprecated in the API.
        """
        body: dict[str, Any] = {"guest_cid": guest_cid, "uds_path": os.fspath(uds_path)}
        if vsock_id is not None:
            body["vsock_id"] = vsock_id
        await self._call("PUT", "/vsock", body)

    # --- actions and state -------------------------------------------------------------------

    async def instance_start(self) -> None:
        """Boot the configured microVM (PUT /actions InstanceStart)."""
        await self._call("PUT", "/actions", {"action_type": "InstanceStart"})

    async def send_ctrl_alt_del(self) -> None:
        """Send Ctrl+Alt+Del to the guest (PUT /actions SendCtrlAltDel), x86_64 only.

        A Linux guest with the i8042 and AT keyboard drivers reboots, and Firecracker exits on the
        reboot, so this is Firecracker's clean shutdown.
        """
        await self._call("PUT", "/actions", {"action_type": "SendCtrlAltDel"})

    async def describe_instance(self) -> dict[str, Any]:
        """Return the instance information of GET /: id, state, vmm_version and app_name.

        state is "Not started", "Running" or "Paused".
        """
        result = await self._call("GET", "/")
        assert isinstance(result, dict)
        return result

    async def pause(self) -> None:
        """Pause the vCPUs (PATCH /vm {"state": "Paused"})."""
        await self._call("PATCH", "/vm", {"state": "Paused"})

    async def resume(self) -> None:
        """Resume the vCPUs (PATCH /vm {"state": "Resumed"})."""
        await self._call("PATCH", "/vm", {"state": "Resumed"})

    # --- snapshots ---------------------------------------------------------------------------

    async def create_snapshot(
        self, snapshot_path: str | os.PathLike[str], mem_file_path: str | os.PathLike[str],
        snapshot_type: SnapshotType = "Full",
    ) -> None:
        """Write the microVM state and guest memory to files (PUT /snapshot/create). The VM must be paused."""
        body = {
            "snapshot_path": os.fspath(snapshot_path),
            "mem_file_path": os.fspath(mem_file_path),
            "snapshot_type": snapshot_type,
        }
        await self._call("PUT", "/snapshot/create", body)

    async def load_snapshot(
        self,
        snapshot_path: str | os.PathLike[str],
        *,
        mem_file_path: str | os.PathLike[str] | None = None,
        mem_backend_path: str | os.PathLike[str] | None = None,
        mem_backend_type: MemoryBackendType = "File",
        resume_vm: bool = False,
        vsock_uds_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Restore a microVM from a snapshot into a fresh Firecracker process (PUT /snapshot/load).

        Give the guest memory as exactly one of mem_backend_path (with mem_backend_type) or the
        deprecated mem_file_path. vsock_uds_path overrides the vsock socket recorded in the
        snapshot. Without resume_vm the restored VM stays paused.
        """
        if (mem_file_path is None) == (mem_backend_path is None):
            raise ValueError("load_snapshot needs exactly one of mem_file_path and mem_backend_path")
        body: dict[str, Any] = {"snapshot_path": os.fspath(snapshot_path), "resume_vm": resume_vm}
        if mem_backend_path is not None:
            body["mem_backend"] = {"backend_type": mem_backend_type, "backend_path": os.fspath(mem_backend_path)}
        else:
            assert mem_file_path is not None
            body["mem_file_path"] = os.fspath(mem_file_path)
        if vsock_uds_path is not None:
            body["vsock_override"] = {"uds_path": os.fspath(vsock_uds_path)}
        await self._call("PUT", "/snapshot/load", body)

    # --- transport ---------------------------------------------------------------------------

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Send one request and return its JSON body, or None for 204.

        Raises FirecrackerError for a 4xx or 5xx response and FirecrackerUnavailable when the socket
        cannot be reached.
        """
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.TransportError as error:
            raise FirecrackerUnavailable(
                f"{method} {path} failed: cannot reach the Firecracker API at {self.api_socket_path}: "
                f"{error or type(error).__name__}"
            ) from error
        if response.status_code >= 400:
            raise FirecrackerError(method, path, response.status_code, _fault_message(response))
        if response.status_code == 204 or not response.content:
            return None
        try:
            result = response.json()
        except json.JSONDecodeError:
            raise FirecrackerError(method, path, response.status_code, f"response is not JSON: {response.text[:200]!r}") from None
        return result if isinstance(result, dict) else {"value": result}


def _fault_message(response: httpx.Response) -> str:
    """Return the fault_message of an error response, or its text when it has none."""
    try:
        body = response.json()
    except json.JSONDecodeError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("fault_message"), str):
        return body["fault_message"]
    return response.text.strip()
