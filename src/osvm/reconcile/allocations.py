"""Allocation of host resources to instances: TCP ports and network-namespace subnets.

Every allocation is recorded in the store with its owner instance, so a daemon restart hands out
nothing twice, and every allocation is released when its instance ends.
"""

import socket

from osvm.store import Store

PORT = "port"
SUBNET = "subnet"

# A free port comes from the kernel. This bounds the retries when the store already contains it.
MAX_PORT_ATTEMPTS = 50


class AllocationError(Exception):
    """A resource could not be allocated; the message names it and what to do."""


def allocate_ports(store: Store, owner: str, declared: dict[str, int]) -> dict[str, int]:
    """Resolve declared ports for instance `owner`: a fixed number is kept, 0 gets a free port.

    Raises AllocationError when a fixed port is held by another live instance or no free port is found.
    """
    resolved: dict[str, int] = {}
    for name, number in sorted(declared.items()):
        if number != 0:
            if not store.allocate(PORT, str(number), owner):
                holder = _holder(store, PORT, str(number))
                raise AllocationError(
                    f"port {name} ({number}) is held by instance {holder}: stop it first or use port 0 to allocate one"
                )
            resolved[name] = number
            continue
        resolved[name] = _allocate_free_port(store, owner, name)
    return resolved


def allocate_subnet_index(store: Store, owner: str, limit: int) -> int:
    """Return the lowest free subnet index in 0..limit-1 for instance `owner`.

    Raises AllocationError when every index is taken.
    """
    taken = {int(value) for _, value, _ in store.allocations(SUBNET)}
    for index in range(limit):
        if index not in taken and store.allocate(SUBNET, str(index), owner):
            return index
    raise AllocationError(
        f"all {limit} network-namespace subnets are in use: stop instances or give the daemon a larger --subnet-pool"
    )


def release(store: Store, owner: str) -> None:
    """Release everything instance `owner` holds."""
    store.release(owner)


def _allocate_free_port(store: Store, owner: str, name: str) -> int:
    for _ in range(MAX_PORT_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            number = probe.getsockname()[1]
        if store.allocate(PORT, str(number), owner):
            return number
    raise AllocationError(f"no free TCP port found for port {name} after {MAX_PORT_ATTEMPTS} attempts")


def _holder(store: Store, kind: str, value: str) -> str:
    for _, held, owner in store.allocations(kind):
        if held == value:
            return owner
    return "unknown"
