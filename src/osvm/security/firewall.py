"""An nftables firewall inside an instance's network namespace.

NamespaceFirewall owns the table `inet osvm` in one namespace. Its chains `input` and `output`
drop every packet by default and accept loopback traffic, packets of established connections, and
the new TCP connections that the ingress and egress rules list. IPv6 is dropped except on loopback,
and so are UDP, ICMP and other protocols unless they belong to an accepted connection.

The chain `forward` applies the same rules to a VM guest behind the tap device GUEST_INTERFACE:
ingress rules to packets routed out to the guest, egress rules to packets routed in from it. In a
namespace with IP forwarding off, as for process instances, nothing reaches that chain. The
separate table `ip osvm-guest` (apply_guest_forwarding) translates the instance's ports to the
guest's address and masquerades the guest's outbound connections behind the instance address.

The ruleset is built as an nftables JSON document (the format of libnftables-json(5), checked
with nftables 1.0.6) and loaded with `nft -j -f -` run through `nsenter --net=/run/netns/NAME`, so
it lives in the instance's namespace and goes away with it. The host's own ruleset is never read or
changed, because every method raises FirewallError instead of running nft when /run/netns/NAME is
the namespace that osvm itself runs in.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
TABLE_FAMILY = "inet"
TABLE_NAME = "osvm"
GUEST_TABLE_NAME = "osvm-guest"
# The namespace's uplink (the veth peer) and the tap device of a VM guest.
UPLINK_INTERFACE = "eth0"
GUEST_INTERFACE = "tap0"
# Loading 50 rules took about 30 ms with nft 1.0.6, so this limit only catches a hung command.
NFT_TIMEOUT = 30.0

# Names of files in /run/netns: no "/", and not "." or "..".
_NETNS_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,254}$")
# One entry of Network.allow_egress: "CIDR" or "CIDR:port", where the CIDR may be a bare IPv4 address.
_EGRESS_ENTRY_PATTERN = re.compile(r"^([0-9.]+(?:/\d{1,2})?)(?::(\d{1,5}))?$")


class FirewallError(Exception):
    """An nft command that failed in the network namespace netns_name. stderr contains nft's error output."""

    def __init__(self, message: str, netns_name: str, stderr: str = "") -> None:
        super().__init__(message)
        self.netns_name = netns_name
        self.stderr = stderr


def _check_port(port: int, field: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"invalid {field} port {port!r}: use an integer from 1 to 65535")


def _parse_ipv4_network(text: str, field: str) -> ipaddress.IPv4Network:
    """Parse an IPv4 address or CIDR. Host bits are allowed and cleared, as nft 1.0.6 also does."""
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError as error:
        raise ValueError(f"invalid {field} {text!r}: write an IPv4 address or CIDR, such as \"10.0.0.0/8\"") from error
    if not isinstance(network, ipaddress.IPv4Network):
        raise ValueError(f"invalid {field} {text!r}: only IPv4 is supported, because the firewall drops all IPv6")
    return network


@dataclass(frozen=True)
class IngressRule:
    """A permission for new TCP connections to port inside the namespace.

    source is the IPv4 address or CIDR the connections may come from, or None for any address.
    """

    port: int
    source: str | None = None

    def __post_init__(self) -> None:
        _check_port(self.port, "ingress")
        if self.source is not None:
            _parse_ipv4_network(self.source, "ingress source")


@dataclass(frozen=True)
class EgressRule:
    """A permission for new TCP connections from the namespace to address (an IPv4 address or CIDR).

    port is the destination port, or None for any port.
    """

    address: str
    port: int | None = None

    def __post_init__(self) -> None:
        _parse_ipv4_network(self.address, "egress address")
        if self.port is not None:
            _check_port(self.port, "egress")


def parse_egress_entry(entry: str) -> EgressRule:
    """Parse one Network.allow_egress entry, "CIDR" or "CIDR:port", into an EgressRule.

    Raises ValueError naming the entry when it is invalid.
    """
    match = _EGRESS_ENTRY_PATTERN.match(entry)
    if match is None:
        raise ValueError(f"invalid egress entry {entry!r}: write \"CIDR\" or \"CIDR:port\", such as \"10.0.0.0/8:443\"")
    port = int(match.group(2)) if match.group(2) is not None else None
    return EgressRule(address=match.group(1), port=port)


# --- the JSON ruleset ---------------------------------------------------------------------------


def _table() -> dict[str, Any]:
    return {"family": TABLE_FAMILY, "name": TABLE_NAME}


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _address_value(network: ipaddress.IPv4Network) -> Any:
    if network.prefixlen == 32:
        return str(network.network_address)
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def _rule(chain: str, expressions: list[dict[str, Any]], comment: str | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"family": TABLE_FAMILY, "table": TABLE_NAME, "chain": chain, "expr": expressions}
    if comment is not None:
        rule["comment"] = comment
    return {"add": {"rule": rule}}


def _chain(name: str) -> dict[str, Any]:
    return {
        "add": {
            "chain": {
                "family": TABLE_FAMILY,
                "table": TABLE_NAME,
                "name": name,
                "type": "filter",
                "hook": name,
                "prio": 0,
                "policy": "drop",
            }
        }
    }


def _common_rules(chain: str, interface_key: str | None) -> list[dict[str, Any]]:
    """Return the rules that open every chain: loopback (when interface_key is given), IPv6, established and invalid packets."""
    # An anonymous counter is {"counter": null}, because nft 1.0.6 reads {"counter": {}} as a
    # reference to a named counter and rejects it.
    counted_drop = [{"counter": None}, {"drop": None}]
    loopback = [_rule(chain, [_match({"meta": {"key": interface_key}}, "lo"), {"accept": None}])] if interface_key else []
    return [
        *loopback,
        _rule(chain, [_match({"meta": {"key": "nfproto"}}, "ipv6"), *counted_drop], "drop IPv6"),
        _rule(chain, [_match({"ct": {"key": "state"}}, ["established", "related"], op="in"), {"accept": None}]),
        _rule(chain, [_match({"ct": {"key": "state"}}, "invalid", op="in"), *counted_drop], "drop invalid"),
    ]


def _final_drop(chain: str) -> dict[str, Any]:
    return _rule(chain, [{"counter": None}, {"drop": None}], "drop the rest")


def _ingress_rule(rule: IngressRule, chain: str = "input") -> dict[str, Any]:
    expressions = []
    if chain == "forward":
        expressions.append(_match({"meta": {"key": "oifname"}}, GUEST_INTERFACE))
    if rule.source is not None:
        source = _parse_ipv4_network(rule.source, "ingress source")
        expressions.append(_match({"payload": {"protocol": "ip", "field": "saddr"}}, _address_value(source)))
    expressions.append(_match({"payload": {"protocol": "tcp", "field": "dport"}}, rule.port))
    expressions.append({"accept": None})
    return _rule(chain, expressions)


def _egress_rule(rule: EgressRule, chain: str = "output") -> dict[str, Any]:
    address = _parse_ipv4_network(rule.address, "egress address")
    expressions = []
    if chain == "forward":
        expressions.append(_match({"meta": {"key": "iifname"}}, GUEST_INTERFACE))
    expressions.append(_match({"payload": {"protocol": "ip", "field": "daddr"}}, _address_value(address)))
    if rule.port is not None:
        expressions.append(_match({"payload": {"protocol": "tcp", "field": "dport"}}, rule.port))
    else:
        expressions.append(_match({"meta": {"key": "l4proto"}}, "tcp"))
    expressions.append({"accept": None})
    return _rule(chain, expressions)


def build_ruleset(ingress: list[IngressRule], egress: list[EgressRule]) -> dict[str, Any]:
    """Build the nft JSON document that replaces table inet osvm with these rules in one transaction.

    The table is added, deleted and added again: the first add makes the delete succeed when the
    table does not exist yet, and nft applies the whole batch or none of it.
    """
    commands: list[dict[str, Any]] = [
        {"metainfo": {"json_schema_version": 1}},
        {"add": {"table": _table()}},
        {"delete": {"table": _table()}},
        {"add": {"table": _table()}},
        _chain("input"),
        _chain("output"),
        _chain("forward"),
    ]
    commands.extend(_common_rules("input", "iif"))
    commands.extend(_ingress_rule(rule) for rule in ingress)
    commands.append(_final_drop("input"))
    commands.extend(_common_rules("output", "oif"))
    commands.extend(_egress_rule(rule) for rule in egress)
    commands.append(_final_drop("output"))
    commands.extend(_common_rules("forward", None))
    commands.extend(_ingress_rule(rule, "forward") for rule in ingress)
    commands.extend(_egress_rule(rule, "forward") for rule in egress)
    commands.append(_final_drop("forward"))
    return {"nftables": commands}


def build_guest_forwarding(instance_address: str, guest_address: str, ports: list[int]) -> dict[str, Any]:
    """Build the nft JSON document that replaces table ip osvm-guest.

    Its prerouting chain sends new TCP connections to instance_address on each port to the same
    port of guest_address. Its postrouting chain masquerades what the guest sends out of the
    uplink, so the guest's connections leave with the instance address, as a process's do.
    """
    _parse_ipv4_network(instance_address, "instance address")
    _parse_ipv4_network(guest_address, "guest address")
    for port in ports:
        _check_port(port, "forwarded")
    table = {"family": "ip", "name": GUEST_TABLE_NAME}

    def nat_chain(name: str, hook: str, priority: int) -> dict[str, Any]:
        chain = {"family": "ip", "table": GUEST_TABLE_NAME, "name": name, "type": "nat", "hook": hook, "prio": priority, "policy": "accept"}
        return {"add": {"chain": chain}}

    def nat_rule(chain: str, expressions: list[dict[str, Any]]) -> dict[str, Any]:
        return {"add": {"rule": {"family": "ip", "table": GUEST_TABLE_NAME, "chain": chain, "expr": expressions}}}

    commands: list[dict[str, Any]] = [
        {"metainfo": {"json_schema_version": 1}},
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
        nat_chain("prerouting", "prerouting", -100),
        nat_chain("postrouting", "postrouting", 100),
    ]
    if ports:
        commands.append(nat_rule("prerouting", [
            _match({"meta": {"key": "iifname"}}, UPLINK_INTERFACE),
            _match({"payload": {"protocol": "ip", "field": "daddr"}}, instance_address),
            _match({"payload": {"protocol": "tcp", "field": "dport"}}, {"set": sorted(set(ports))}),
            {"dnat": {"family": "ip", "addr": guest_address}},
        ]))
    commands.append(nat_rule("postrouting", [
        _match({"meta": {"key": "iifname"}}, GUEST_INTERFACE),
        _match({"meta": {"key": "oifname"}}, UPLINK_INTERFACE),
        {"masquerade": None},
    ]))
    return {"nftables": commands}


def count_dropped_packets(ruleset: dict[str, Any]) -> int:
    """Sum the packet counters of the rules in ruleset (nft -j list output) whose verdict is drop."""
    total = 0
    for item in ruleset.get("nftables", []):
        rule = item.get("rule")
        if rule is None:
            continue
        expressions = rule.get("expr", [])
        if not any("drop" in expression for expression in expressions):
            continue
        for expression in expressions:
            counter = expression.get("counter")
            if isinstance(counter, dict):
                total += int(counter.get("packets", 0))
    return total


# --- running nft in the namespace ---------------------------------------------------------------


class NamespaceFirewall:
    """The table inet osvm in the network namespace /run/netns/<netns_name>."""

    def __init__(self, netns_name: str) -> None:
        if not _NETNS_NAME_PATTERN.match(netns_name) or netns_name in (".", ".."):
            raise ValueError(f"invalid network namespace name {netns_name!r}: use the name of a file in {NETNS_DIR}")
        self.netns_name = netns_name
        self.netns_path = os.path.join(NETNS_DIR, netns_name)

    def __repr__(self) -> str:
        return f"NamespaceFirewall(netns_name={self.netns_name!r})"

    def apply(self, ingress: list[IngressRule], egress: list[EgressRule]) -> None:
        """Replace the table with one that accepts only these connections, in one nft transaction.

        Raises FirewallError with nft's stderr when nft rejects the ruleset or the namespace is
        missing. The previous table then stays as it was.
        """
        document = json.dumps(build_ruleset(ingress, egress))
        self._run_nft(["-j", "-f", "-"], "apply firewall", document)
        logger.info(
            "applied firewall in network namespace %s: %d ingress and %d egress rules",
            self.netns_name,
            len(ingress),
            len(egress),
        )

    def apply_guest_forwarding(self, instance_address: str, guest_address: str, ports: list[int]) -> None:
        """Load table ip osvm-guest (see build_guest_forwarding) in one nft transaction. Raises FirewallError."""
        document = json.dumps(build_guest_forwarding(instance_address, guest_address, ports))
        self._run_nft(["-j", "-f", "-"], "apply guest forwarding", document)
        logger.info(
            "applied guest forwarding in network namespace %s: ports %s of %s to %s",
            self.netns_name, ", ".join(map(str, sorted(set(ports)))) or "none", instance_address, guest_address,
        )

    def remove(self) -> None:
        """Delete the table. Does nothing when the table or the whole namespace is already gone."""
        if not os.path.lexists(self.netns_path):
            return
        document = json.dumps({
            "nftables": [
                {"metainfo": {"json_schema_version": 1}},
                {"add": {"table": _table()}},
                {"delete": {"table": _table()}},
            ]
        })
        self._run_nft(["-j", "-f", "-"], "remove firewall", document)
        logger.info("removed firewall from network namespace %s", self.netns_name)

    def rules(self) -> dict[str, Any]:
        """Return the table as `nft -j list table inet osvm` prints it, parsed, or {} when there is no table."""
        if not self._table_exists():
            return {}
        output = self._run_nft(["-j", "list", "table", TABLE_FAMILY, TABLE_NAME], "list firewall")
        return json.loads(output)

    def dropped_packets(self) -> int:
        """Return the packets that the counted drop rules of both chains dropped, or 0 when there is no table."""
        return count_dropped_packets(self.rules())

    def _table_exists(self) -> bool:
        output = self._run_nft(["-j", "list", "tables"], "list tables")
        for item in json.loads(output).get("nftables", []):
            table = item.get("table")
            if table is not None and table.get("family") == TABLE_FAMILY and table.get("name") == TABLE_NAME:
                return True
        return False

    def _run_nft(self, arguments: list[str], action: str, stdin: str | None = None) -> str:
        """Run nft with arguments in the namespace and return its stdout. Raises FirewallError."""
        self._check_not_own_namespace(action)
        command = ["nsenter", f"--net={self.netns_path}", "nft", *arguments]
        try:
            result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=NFT_TIMEOUT)
        except FileNotFoundError as error:
            raise FirewallError(
                f"failed to {action} in network namespace {self.netns_name}: nsenter not found. "
                "Install util-linux",
                self.netns_name,
            ) from error
        except subprocess.TimeoutExpired as error:
            raise FirewallError(
                f"failed to {action} in network namespace {self.netns_name}: nft timed out after {NFT_TIMEOUT:g} s",
                self.netns_name,
            ) from error

        if result.returncode != 0:
            stderr = result.stderr.strip()
            hint = ". Install nftables" if result.returncode == 127 else ""
            raise FirewallError(
                f"failed to {action} in network namespace {self.netns_name}: "
                f"{' '.join(command[2:])} exited with {result.returncode}: {stderr}{hint}",
                self.netns_name,
                stderr,
            )
        return result.stdout

    def _check_not_own_namespace(self, action: str) -> None:
        """Raise FirewallError when netns_path is missing or is the namespace that osvm runs in.

        A bind mount of the host's namespace under /run/netns would otherwise let apply() replace
        the host's table inet osvm.
        """
        try:
            target = os.stat(self.netns_path)
        except FileNotFoundError as error:
            raise FirewallError(
                f"failed to {action}: network namespace {self.netns_name} not found at {self.netns_path}",
                self.netns_name,
            ) from error
        own = os.stat("/proc/self/ns/net")
        if (target.st_dev, target.st_ino) == (own.st_dev, own.st_ino):
            raise FirewallError(
                f"failed to {action}: {self.netns_path} is the network namespace that osvm runs in, "
                "and osvm never changes the host's ruleset",
                self.netns_name,
            )
