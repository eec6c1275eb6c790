"""A network namespace with a veth pair per instance.

Each instance gets a named network namespace ``osvm-<name>``, bind-mounted at
``/run/netns/osvm-<name>`` the way ``ip netns add`` does, so ``ip netns exec``
and ``nsenter --net=<path>`` work on it. A veth pair links it to the host: the
host side ``ov-<id>`` carries the host address, and the peer, moved into the
namespace and renamed ``eth0``, carries the instance address and a default
route via the host address. The host reaches the instance over the directly
connected /30. Nothing here adds NAT or forwarding rules, so the instance
reaches only the host.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
import re
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

logger = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
NETNS_PREFIX = "osvm-"
HOST_IFNAME_PREFIX = "ov-"
# Name prefix of the veth peer while it is on the host, before it moves into
# the namespace and is renamed eth0.
PEER_IFNAME_PREFIX = "op-"
INSTANCE_IFNAME = "eth0"
DEFAULT_POOL = "10.213.0.0/16"

# Linux limits interface names to IFNAMSIZ - 1 = 15 bytes. The prefixes are 3
# characters, so the id may be up to 12.
SHORT_ID_LENGTH = 10

# Instance names become part of a file name under /run/netns.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class NetworkError(Exception):
    """Creating or removing an instance network failed at step."""

    def __init__(self, message: str, step: str):
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class VethAddressing:
    """IPv4 addresses of the two ends of an instance's veth pair, in one
    subnet of prefixlen bits."""

    host_address: str
    instance_address: str
    prefixlen: int


def addressing_for(index: int, pool: str = DEFAULT_POOL) -> VethAddressing:
    """Return the addressing of the index-th /30 subnet in pool: its first
    host address for the host side and its second for the instance.

    Raises ValueError for a negative index, an invalid or non-IPv4 pool, a
    pool smaller than a /30, or an index past the end of the pool.
    """
    network = ipaddress.ip_network(pool)  # strict: rejects host bits set
    if network.version != 4:
        raise ValueError(f"invalid address pool {pool}: must be an IPv4 network")
    if network.prefixlen > 30:
        raise ValueError(f"invalid address pool {pool}: must be a /30 or larger")
    if index < 0:
        raise ValueError(f"invalid addressing index {index}: must be 0 or greater")
    subnet_count = 2 ** (30 - network.prefixlen)
    if index >= subnet_count:
        raise ValueError(
            f"address pool {pool} is exhausted: index {index} is past its {subnet_count} /30 subnets. "
            "Use a larger pool or free an index"
        )
    base = network.network_address + index * 4
    return VethAddressing(host_address=str(base + 1), instance_address=str(base + 2), prefixlen=30)


def _check_name(name: str) -> None:
    if not _NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid instance name {name!r}: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


def _check_addressing(addressing: VethAddressing) -> None:
    try:
        host = ipaddress.IPv4Interface(f"{addressing.host_address}/{addressing.prefixlen}")
        instance = ipaddress.IPv4Interface(f"{addressing.instance_address}/{addressing.prefixlen}")
    except ValueError as error:
        raise ValueError(f"invalid addressing {addressing}: {error}") from error
    if host.network != instance.network:
        raise ValueError(f"invalid addressing {addressing}: the two addresses are in different subnets")
    if host.ip == instance.ip:
        raise ValueError(f"invalid addressing {addressing}: the two addresses are equal")


def short_id(name: str) -> str:
    """Return a stable id for name that fits in an interface name: the first
    SHORT_ID_LENGTH hex digits of its SHA-1."""
    return hashlib.sha1(name.encode()).hexdigest()[:SHORT_ID_LENGTH]


def _netns_path(netns_name: str) -> str:
    return os.path.join(NETNS_DIR, netns_name)


def _lookup_link(ipr: IPRoute, ifname: str) -> int | None:
    indexes = ipr.link_lookup(ifname=ifname)
    return indexes[0] if indexes else None


def _ipv4_address(ipr: IPRoute, index: int) -> tuple[str, int] | None:
    for message in ipr.addr("dump", index=index, family=socket.AF_INET):
        return message.get("address"), message["prefixlen"]
    return None


class InstanceNetwork:
    """The network namespace and veth pair of one instance."""

    def __init__(self, name: str, addressing: VethAddressing | None):
        _check_name(name)
        self.name = name
        self.netns_name = NETNS_PREFIX + name
        self.netns_path = _netns_path(self.netns_name)
        self.host_ifname = HOST_IFNAME_PREFIX + short_id(name)
        # None only for a network opened after a partial failure, when an
        # interface or its address is missing.
        self.addressing = addressing

    def __repr__(self) -> str:
        return (
            f"InstanceNetwork(name={self.name!r}, netns_path={self.netns_path!r}, "
            f"host_ifname={self.host_ifname!r}, addressing={self.addressing!r})"
        )

    @classmethod
    def create(cls, name: str, addressing: VethAddressing) -> InstanceNetwork:
        """Create the namespace and veth pair of instance name.

        Raises NetworkError naming the failed step, after removing what this
        call created. A namespace or host interface that already exists is
        left as it was.
        """
        _check_name(name)
        _check_addressing(addressing)
        network = cls(name, addressing)
        network._create()
        logger.info(
            "created network of instance %s: namespace %s, host interface %s %s/%d, instance %s/%d",
            name,
            network.netns_name,
            network.host_ifname,
            addressing.host_address,
            addressing.prefixlen,
            addressing.instance_address,
            addressing.prefixlen,
        )
        return network

    def _create(self) -> None:
        addressing = self.addressing
        assert addressing is not None
        peer_ifname = PEER_IFNAME_PREFIX + short_id(self.name)

        if os.path.lexists(self.netns_path):
            raise NetworkError(
                f"failed to create network namespace {self.netns_name}: {self.netns_path} already exists. "
                "Remove the instance network first or choose another name",
                "create network namespace",
            )
        with IPRoute() as ipr:
            for ifname in (self.host_ifname, peer_ifname):
                if _lookup_link(ipr, ifname) is not None:
                    raise NetworkError(
                        f"failed to create veth pair for instance {self.name}: interface {ifname} already exists. "
                        f"Delete it with 'ip link del {ifname}' if it is a leftover",
                        "create veth pair",
                    )

        created_netns = False
        created_veth = False
        step = "create network namespace"
        try:
            pyroute2_netns.create(self.netns_path)
            created_netns = True

            step = "create veth pair"
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.host_ifname, kind="veth", peer={"ifname": peer_ifname})
                created_veth = True
                host_index = _lookup_link(ipr, self.host_ifname)
                peer_index = _lookup_link(ipr, peer_ifname)
                if host_index is None or peer_index is None:
                    raise NetworkError(f"veth pair {self.host_ifname} disappeared after creation", step)

                step = "configure host interface"
                ipr.addr("add", index=host_index, address=addressing.host_address, prefixlen=addressing.prefixlen)
                ipr.link("set", index=host_index, state="up")

                step = "move peer into namespace"
                ipr.link("set", index=peer_index, net_ns_fd=self.netns_path)

            step = "configure instance interface"
            self._configure_instance_side(peer_ifname)
        except (OSError, NetlinkError, NetworkError, RuntimeError, TypeError) as error:
            # RuntimeError and TypeError come from pyroute2 when a child
            # process that enters the namespace fails.
            self._remove_created(created_veth, created_netns)
            raise NetworkError(f"failed to {step} for instance {self.name}: {error}", step) from error

    def _configure_instance_side(self, peer_ifname: str) -> None:
        addressing = self.addressing
        assert addressing is not None
        # pyroute2 takes a path for the namespace (a bare name would resolve
        # under /var/run/netns). flags=0 opens it without creating it when it
        # is missing.
        with IPRoute(netns=self.netns_path, flags=0) as ns:
            peer_index = _lookup_link(ns, peer_ifname)
            loopback_index = _lookup_link(ns, "lo")
            if peer_index is None or loopback_index is None:
                raise NetworkError(
                    f"interface {peer_ifname} or lo not found in namespace {self.netns_name}",
                    "configure instance interface",
                )
            ns.link("set", index=peer_index, ifname=INSTANCE_IFNAME)
            ns.addr("add", index=peer_index, address=addressing.instance_address, prefixlen=addressing.prefixlen)
            ns.link("set", index=peer_index, state="up")
            ns.link("set", index=loopback_index, state="up")
            ns.route("add", dst="0.0.0.0/0", gateway=addressing.host_address)

    def _remove_created(self, created_veth: bool, created_netns: bool) -> None:
        """Remove what a failed create made, logging errors because the
        create error is the one raised."""
        if created_veth:
            try:
                self._delete_host_link()
            except (OSError, NetlinkError) as error:
                logger.error(
                    "failed to delete interface %s of instance %s after a failed create: %s",
                    self.host_ifname,
                    self.name,
                    error,
                )
        if created_netns:
            try:
                self._delete_netns()
            except OSError as error:
                logger.error(
                    "failed to remove network namespace %s after a failed create: %s", self.netns_name, error
                )

    @classmethod
    def open(cls, name: str) -> InstanceNetwork | None:
        """Open the network of instance name, or return None when its
        namespace does not exist.

        The addressing is read from the interfaces. It is None when the host
        interface, eth0 in the namespace or an IPv4 address on either is
        missing.
        """
        _check_name(name)
        network = cls(name, None)
        if not os.path.lexists(network.netns_path):
            return None
        network.addressing = network._read_addressing()
        if network.addressing is None:
            logger.warning("network of instance %s is incomplete: interface or address missing", name)
        return network

    def _read_addressing(self) -> VethAddressing | None:
        try:
            with IPRoute() as ipr:
                host_index = _lookup_link(ipr, self.host_ifname)
                host = _ipv4_address(ipr, host_index) if host_index is not None else None
            with IPRoute(netns=self.netns_path, flags=0) as ns:
                instance_index = _lookup_link(ns, INSTANCE_IFNAME)
                instance = _ipv4_address(ns, instance_index) if instance_index is not None else None
        except (OSError, NetlinkError, RuntimeError, TypeError) as error:
            logger.warning("failed to read addresses of instance network %s: %s", self.name, error)
            return None
        if host is None or instance is None:
            return None
        return VethAddressing(host_address=host[0], instance_address=instance[0], prefixlen=host[1])

    @classmethod
    def list_names(cls) -> list[str]:
        """Return the sorted instance names of the osvm-* namespaces in
        /run/netns."""
        try:
            entries = os.listdir(NETNS_DIR)
        except FileNotFoundError:
            return []
        return sorted(
            entry[len(NETNS_PREFIX) :]
            for entry in entries
            if entry.startswith(NETNS_PREFIX) and len(entry) > len(NETNS_PREFIX)
        )

    def remove(self) -> None:
        """Delete the host veth (its peer goes with it) and the namespace.

        Removing a network that no longer exists does nothing. Raises
        NetworkError naming the step that failed.
        """
        removed: list[str] = []
        try:
            if self._delete_host_link():
                removed.append(f"interface {self.host_ifname}")
        except (OSError, NetlinkError) as error:
            raise NetworkError(
                f"failed to delete interface {self.host_ifname} of instance {self.name}: {error}",
                "delete veth pair",
            ) from error
        try:
            if self._delete_netns():
                removed.append(f"namespace {self.netns_name}")
        except OSError as error:
            raise NetworkError(
                f"failed to remove network namespace {self.netns_name}: {error}", "remove network namespace"
            ) from error
        if removed:
            logger.info("removed network of instance %s: %s", self.name, ", ".join(removed))

    def _delete_host_link(self) -> bool:
        """Delete the host interface. Returns False when it did not exist."""
        with IPRoute() as ipr:
            index = _lookup_link(ipr, self.host_ifname)
            if index is None:
                return False
            try:
                ipr.link("del", index=index)
            except NetlinkError as error:
                if error.code == errno.ENODEV:
                    return False  # deleted since the lookup
                raise
        return True

    def _delete_netns(self) -> bool:
        """Unmount and delete the namespace file. The namespace itself lives
        on while a process is still in it. Returns False when the file did not
        exist."""
        if not os.path.lexists(self.netns_path):
            return False
        try:
            pyroute2_netns.remove(self.netns_path)
        except FileNotFoundError:
            return False
        return True
