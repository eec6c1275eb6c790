"""Guest CIDs and vsock ports, allocated in the store so that they survive a daemon restart.

Each allocation is a row of the store's allocations table: kind "cid" with the CID as value, or
kind "vsock-port" with "<cid>:<port>" as value. The owner is normally an instance id. The table's
primary key (kind, value) makes a value unique, so two daemons on one state directory cannot
hand out the same CID.
"""

import logging
from collections.abc import Iterable

from osvm.store import Store

logger = logging.getLogger("osvm.vsock")

# CIDs 0 (hypervisor), 1 (local loopback) and 2 (VMADDR_CID_HOST) are reserved.
VMADDR_CID_HOST = 2
FIRST_GUEST_CID = 3
# VMADDR_CID_ANY is 0xFFFFFFFF (U32_MAX), so the largest usable CID is one below it.
MAX_GUEST_CID = 0xFFFF_FFFE

# Ports below 1024 need CAP_NET_BIND_SERVICE in a Linux guest. VMADDR_PORT_ANY is U32_MAX.
FIRST_DYNAMIC_PORT = 1024
MAX_PORT = 0xFFFF_FFFE

CID_KIND = "cid"
PORT_KIND = "vsock-port"


class AllocationError(Exception):
    """A CID or vsock port could not be allocated; the message names it and the reason."""


class CidAllocator:
    """Allocate guest CIDs from 3 up, one per owner, reusing the lowest released CID first.

    NOTE: the allocator tracks only the CIDs in its own store. With vhost-vsock, CIDs are global to
    the host kernel, so a VM started outside osvm can hold a CID that the store shows as free. The
    runtime then gets EADDRINUSE from the VMM and should allocate again with that CID in `avoid`.
    Firecracker's hybrid vsock never registers the CID with the host kernel, so the clash cannot
    happen there.
    """

    def __init__(self, store: Store):
        self.store = store

    def allocate(self, owner: str, avoid: Iterable[int] = ()) -> int:
        """Return the CID allocated to `owner`, allocating the lowest free one if there is none.

        CIDs in `avoid` are skipped. Raises AllocationError when every CID is taken.
        """
        current_cid = self.cid_of(owner)
        avoided = set(avoid)
        if current_cid is not None and current_cid not in avoided:
            return current_cid
        if current_cid is not None:
            self.release(owner)
        while True:
            used_cids = {int(value) for _, value, _ in self.store.allocations(kind=CID_KIND)} | avoided
            cid = _lowest_free(used_cids, FIRST_GUEST_CID, MAX_GUEST_CID)
            if cid is None:
                raise AllocationError(f"no free guest CID for {owner}: all CIDs {FIRST_GUEST_CID} to {MAX_GUEST_CID} are taken")
            # Another daemon on the same store may take the CID between the read and the insert,
            # so a lost insert means: read again and take the next free one.
            if self.store.allocate(CID_KIND, str(cid), owner):
                logger.debug("allocated guest CID %d to %s", cid, owner)
                return cid

    def cid_of(self, owner: str) -> int | None:
        """Return the CID allocated to `owner`, or None."""
        rows = self.store.allocations(kind=CID_KIND, owner=owner)
        return min(int(value) for _, value, _ in rows) if rows else None

    def release(self, owner: str) -> None:
        """Release the CID of `owner`, so that the next allocate() may hand it out again."""
        self.store.release(owner, kind=CID_KIND)

    def allocated(self) -> dict[int, str]:
        """Return every allocated CID with its owner."""
        return {int(value): owner for _, value, owner in self.store.allocations(kind=CID_KIND)}


class PortAllocator:
    """Allocate vsock ports per guest CID, such as the ports on which guest services listen."""

    def __init__(self, store: Store):
        self.store = store

    def allocate(self, owner: str, cid: int, port: int | None = None) -> int:
        """Allocate `port` on `cid` to `owner`, or the lowest free port from 1024 up when port is None.

        Allocating a port that is already allocated to `owner` returns it again. Raises
        AllocationError when the requested port belongs to another owner or every port on the CID
        is taken.
        """
        _check_range("CID", cid, FIRST_GUEST_CID, MAX_GUEST_CID)
        if port is not None:
            _check_range("vsock port", port, 0, MAX_PORT)
            if not self.store.allocate(PORT_KIND, _port_value(cid, port), owner):
                holder = self._holder(cid, port)
                raise AllocationError(f"vsock port {port} on CID {cid} is already allocated to {holder}: choose another port")
            return port
        while True:
            used_ports = set(self._ports_on(cid))
            free = _lowest_free(used_ports, FIRST_DYNAMIC_PORT, MAX_PORT)
            if free is None:
                raise AllocationError(f"no free vsock port on CID {cid} for {owner}")
            if self.store.allocate(PORT_KIND, _port_value(cid, free), owner):
                return free

    def ports_of(self, owner: str) -> list[tuple[int, int]]:
        """Return the (cid, port) pairs allocated to `owner`, sorted."""
        pairs = [_parse_port_value(value) for _, value, _ in self.store.allocations(kind=PORT_KIND, owner=owner)]
        return sorted(pairs)

    def release(self, owner: str) -> None:
        """Release every vsock port allocated to `owner`."""
        self.store.release(owner, kind=PORT_KIND)

    def _ports_on(self, cid: int) -> list[int]:
        ports = []
        for _, value, _ in self.store.allocations(kind=PORT_KIND):
            value_cid, port = _parse_port_value(value)
            if value_cid == cid:
                ports.append(port)
        return ports

    def _holder(self, cid: int, port: int) -> str:
        for _, value, owner in self.store.allocations(kind=PORT_KIND):
            if value == _port_value(cid, port):
                return owner
        return "another owner"


def _lowest_free(used: set[int], first: int, last: int) -> int | None:
    candidate = first
    for value in sorted(number for number in used if number >= first):
        if value > candidate:
            break
        if value == candidate:
            candidate += 1
    return candidate if candidate <= last else None


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise AllocationError(f"invalid {name} {value}: use {low} to {high}")


def _port_value(cid: int, port: int) -> str:
    return f"{cid}:{port}"


def _parse_port_value(value: str) -> tuple[int, int]:
    cid, port = value.split(":", 1)
    return int(cid), int(port)
