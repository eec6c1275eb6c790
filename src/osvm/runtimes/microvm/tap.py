"""The guest's network in an instance's namespace: a tap device, forwarding and address translation.

In the namespace that create_instance_network made (eth0 to the host, the firewall in table inet
osvm), create_guest_tap adds:

- tap0, persistent and owned by the user QEMU runs as, with the guest's gateway address
  10.0.2.2/24; QEMU attaches to it with `-netdev tap,ifname=tap0`;
- IP forwarding, for this namespace only;
- table ip osvm-guest: the instance's ports on its address are translated to the guest's
  10.0.2.15, and the guest's outbound connections leave with the instance address.

The guest keeps the addresses it has on QEMU's user network, so the agent configures it the same
way in both modes. The tap device goes away with the namespace.
"""

import logging
import subprocess

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from osvm.security.firewall import GUEST_INTERFACE, FirewallError, NamespaceFirewall

logger = logging.getLogger("osvm.runtimes.microvm")

GUEST_GATEWAY = "10.0.2.2"
GUEST_PREFIXLEN = 24
SYSCTL_TIMEOUT = 10.0


class TapError(Exception):
    """The tap device or the guest's forwarding could not be set up; the message names the step."""


def create_guest_tap(
    netns_name: str, instance_address: str, guest_address: str, ports: list[int], uid: int | None, gid: int | None
) -> None:
    """Create tap0 in the namespace, enable forwarding there and load table ip osvm-guest.

    Raises TapError naming the step that failed. What was made stays until the namespace is removed.
    """
    netns_path = f"/run/netns/{netns_name}"
    step = "create tap device"
    try:
        with IPRoute(netns=netns_path, flags=0) as ns:
            if ns.link_lookup(ifname=GUEST_INTERFACE):
                ns.link("del", index=ns.link_lookup(ifname=GUEST_INTERFACE)[0])
            options: dict[str, object] = {"ifname": GUEST_INTERFACE, "kind": "tuntap", "mode": "tap"}
            if uid is not None:
                options["uid"] = uid
            if gid is not None:
                options["gid"] = gid
            ns.link("add", **options)
            index = ns.link_lookup(ifname=GUEST_INTERFACE)
            if not index:
                raise TapError(f"{GUEST_INTERFACE} did not appear in namespace {netns_name} after creation")
            step = "configure tap device"
            ns.addr("add", index=index[0], address=GUEST_GATEWAY, prefixlen=GUEST_PREFIXLEN)
            ns.link("set", index=index[0], state="up")
    except (OSError, NetlinkError, RuntimeError, TypeError) as error:
        # RuntimeError and TypeError come from pyroute2 when its helper in the namespace fails.
        raise TapError(f"failed to {step} {GUEST_INTERFACE} in namespace {netns_name}: {error}") from None

    _enable_forwarding(netns_path, netns_name)
    try:
        NamespaceFirewall(netns_name).apply_guest_forwarding(instance_address, guest_address, ports)
    except FirewallError as error:
        raise TapError(str(error)) from None
    logger.info(
        "created %s in namespace %s: guest %s via %s, forwarded ports %s",
        GUEST_INTERFACE, netns_name, guest_address, GUEST_GATEWAY, ", ".join(map(str, ports)) or "none",
    )


def _enable_forwarding(netns_path: str, netns_name: str) -> None:
    # /proc/sys/net shows the network namespace of the process that opens it, so the write has to
    # happen inside the namespace.
    command = ["nsenter", f"--net={netns_path}", "--", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=SYSCTL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise TapError(f"failed to enable IP forwarding in namespace {netns_name}: {error}") from None
    if result.returncode != 0:
        raise TapError(
            f"failed to enable IP forwarding in namespace {netns_name}: sysctl exited with {result.returncode}: "
            f"{result.stderr.strip()}. Install the Debian package procps if sysctl is missing"
        )
