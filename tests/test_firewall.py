"""Tests of osvm.security.firewall.

Tests marked root create real network namespaces with InstanceNetwork, load the firewall into one
of them with nft, and send TCP traffic only between the host side of the namespaces' veth pairs,
addresses inside the namespaces, and loopback. The host forwards no packets between namespaces
(ip_forward may be 0), so ingress is checked with connections from the host to a server in the
namespace, and egress with connections from the namespace to a server on the host-side address.
The host's ruleset is only listed, never changed.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from osvm.runtimes.netns import InstanceNetwork, NetworkError, addressing_for
from osvm.security import firewall
from osvm.security.firewall import (
    EgressRule,
    FirewallError,
    IngressRule,
    NamespaceFirewall,
    build_guest_forwarding,
    build_ruleset,
    count_dropped_packets,
    parse_egress_entry,
)

TEST_POOL = "10.252.0.0/16"
# A blocked connection attempt gives up after this many seconds.
CONNECT_TIMEOUT = 1.0
# An address outside every test subnet, as an ingress source that the host never uses.
OTHER_SOURCE = "192.0.2.1"


# Rules and the JSON ruleset, without root.


def test_ingress_rule_validation():
    assert IngressRule(8080).source is None
    assert IngressRule(8080, "10.0.0.0/8").source == "10.0.0.0/8"
    for port in [0, 65536, -1, True, "80"]:
        with pytest.raises(ValueError, match="invalid ingress port"):
            IngressRule(port)
    for source in ["10.0.0.0/33", "fd00::1", "host.example", ""]:
        with pytest.raises(ValueError, match="invalid ingress source"):
            IngressRule(8080, source)


def test_egress_rule_validation():
    assert EgressRule("10.0.0.1").port is None
    for port in [0, 65536]:
        with pytest.raises(ValueError, match="invalid egress port"):
            EgressRule("10.0.0.1", port)
    for address in ["10.0.0.300", "::1", "10.0.0.0/40"]:
        with pytest.raises(ValueError, match="invalid egress address"):
            EgressRule(address)


def test_parse_egress_entry():
    cases = [
        ("10.0.0.0/8", EgressRule("10.0.0.0/8")),
        ("10.0.0.0/8:443", EgressRule("10.0.0.0/8", 443)),
        ("192.0.2.7", EgressRule("192.0.2.7")),
        ("192.0.2.7:8545", EgressRule("192.0.2.7", 8545)),
    ]
    for entry, expected in cases:
        assert parse_egress_entry(entry) == expected
    for entry in ["", "10.0.0.0/8:", "10.0.0.0/8:0", "[::1]:80", "10.0.0.0/8:443:1", "10.0.0.256"]:
        with pytest.raises(ValueError, match="invalid egress"):
            parse_egress_entry(entry)


def rules_of(document: dict, chain: str) -> list[list[dict]]:
    return [
        command["add"]["rule"]["expr"]
        for command in document["nftables"]
        if "rule" in command.get("add", {}) and command["add"]["rule"]["chain"] == chain
    ]


def test_build_ruleset_replaces_table():
    document = build_ruleset([], [])
    commands = document["nftables"]

    assert commands[0] == {"metainfo": {"json_schema_version": 1}}
    table = {"family": "inet", "name": "osvm"}
    assert commands[1:4] == [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    chains = [command["add"]["chain"] for command in commands if "chain" in command.get("add", {})]
    assert [(chain["name"], chain["hook"], chain["policy"]) for chain in chains] == [
        ("input", "input", "drop"),
        ("output", "output", "drop"),
        ("forward", "forward", "drop"),
    ]


def test_build_ruleset_rule_order():
    document = build_ruleset([IngressRule(8000, "10.1.0.0/16"), IngressRule(9000)], [EgressRule("10.2.0.1", 443)])
    tcp_dport = {"payload": {"protocol": "tcp", "field": "dport"}}

    input_rules = rules_of(document, "input")
    output_rules = rules_of(document, "output")

    # Loopback, IPv6 drop, established, invalid drop, the listed rules, then the counted drop.
    assert input_rules[0][0]["match"]["left"] == {"meta": {"key": "iif"}}
    assert input_rules[1][0]["match"]["right"] == "ipv6"
    assert input_rules[2][0]["match"]["right"] == ["established", "related"]
    assert input_rules[3][0]["match"]["right"] == "invalid"
    assert input_rules[4][0]["match"]["right"] == {"prefix": {"addr": "10.1.0.0", "len": 16}}
    assert input_rules[4][1]["match"] == {"op": "==", "left": tcp_dport, "right": 8000}
    assert input_rules[5] == [{"match": {"op": "==", "left": tcp_dport, "right": 9000}}, {"accept": None}]
    assert input_rules[6] == [{"counter": None}, {"drop": None}]
    assert len(input_rules) == 7

    assert output_rules[0][0]["match"]["left"] == {"meta": {"key": "oif"}}
    assert output_rules[4][0]["match"]["right"] == "10.2.0.1"
    assert output_rules[4][1]["match"]["right"] == 443
    assert output_rules[5] == [{"counter": None}, {"drop": None}]
    assert len(output_rules) == 6

    # The forward chain has no loopback rule, and each listed rule is tied to the guest's tap device.
    forward_rules = rules_of(document, "forward")
    assert forward_rules[0][0]["match"]["right"] == "ipv6"
    assert forward_rules[3][0]["match"] == {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "tap0"}
    assert forward_rules[4][0]["match"] == {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "tap0"}
    assert forward_rules[5][0]["match"] == {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "tap0"}
    assert forward_rules[6] == [{"counter": None}, {"drop": None}]
    assert len(forward_rules) == 7


def test_build_guest_forwarding():
    document = build_guest_forwarding("10.1.0.2", "10.0.2.15", [8545, 8000, 8545])
    commands = document["nftables"]
    table = {"family": "ip", "name": "osvm-guest"}
    assert commands[1:4] == [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    prerouting = rules_of(document, "prerouting")
    assert prerouting == [[
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.1.0.2"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"set": [8000, 8545]}}},
        {"dnat": {"family": "ip", "addr": "10.0.2.15"}},
    ]]
    assert rules_of(document, "postrouting")[0][-1] == {"masquerade": None}

    with pytest.raises(ValueError, match="forwarded port 0"):
        build_guest_forwarding("10.1.0.2", "10.0.2.15", [0])
    with pytest.raises(ValueError, match="instance address"):
        build_guest_forwarding("fe80::1", "10.0.2.15", [80])


def test_build_ruleset_egress_any_port():
    document = build_ruleset([], [EgressRule("10.2.0.5/24")])

    egress = rules_of(document, "output")[4]

    # Host bits are cleared, as nft 1.0.6 does.
    assert egress[0]["match"]["right"] == {"prefix": {"addr": "10.2.0.0", "len": 24}}
    assert egress[1]["match"] == {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}


def test_count_dropped_packets():
    listing = {"nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"table": {"family": "inet", "name": "osvm"}},
        {"rule": {"chain": "input", "expr": [{"counter": {"packets": 3, "bytes": 180}}, {"drop": None}]}},
        {"rule": {"chain": "input", "expr": [{"counter": {"packets": 7, "bytes": 420}}, {"accept": None}]}},
        {"rule": {"chain": "output", "expr": [{"counter": {"packets": 2, "bytes": 120}}, {"drop": None}]}},
        {"rule": {"chain": "output", "expr": [{"drop": None}]}},
    ]}

    assert count_dropped_packets(listing) == 5
    assert count_dropped_packets({}) == 0


def test_firewall_rejects_invalid_netns_name():
    for name in ["", ".", "..", "a/b", "../x"]:
        with pytest.raises(ValueError, match="invalid network namespace name"):
            NamespaceFirewall(name)


def test_firewall_missing_namespace():
    wall = NamespaceFirewall(f"osvm-missing-{os.getpid()}")

    with pytest.raises(FirewallError, match="not found") as raised:
        wall.apply([IngressRule(80)], [])

    assert raised.value.netns_name == wall.netns_name
    wall.remove()  # a missing namespace has no table to delete


# Real namespaces.


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def used_networks() -> list[ipaddress.IPv4Network]:
    """Return the IPv4 networks of the host's addresses and routes, except default routes."""
    networks = []
    for line in run("ip", "-4", "-o", "addr", "show").splitlines():
        fields = line.split()
        networks.append(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]).network)
    for line in run("ip", "-4", "route", "show", "table", "all").splitlines():
        destination = line.split()[0]
        if destination[0].isdigit():
            networks.append(ipaddress.IPv4Network(destination, strict=False))
    return networks


@pytest.fixture
def root_with_nft():
    if os.geteuid() != 0:
        pytest.skip("firewall tests need root to create network namespaces and load nftables rules")
    for tool, package in [("nft", "nftables"), ("nsenter", "util-linux"), ("ip", "iproute2")]:
        if shutil.which(tool) is None:
            pytest.skip(f"firewall tests need {tool} on PATH (Debian package {package})")


@pytest.fixture
def networks(root_with_nft) -> Iterator[Callable[[str], InstanceNetwork]]:
    """Create instance networks with free test addresses, and remove every one afterwards, also on failure."""
    names: list[str] = []
    used = used_networks()
    next_index = (os.getpid() * 8) % 16384

    def create(suffix: str) -> InstanceNetwork:
        nonlocal next_index
        while True:
            addressing = addressing_for(next_index % 16384, TEST_POOL)
            next_index += 1
            subnet = ipaddress.IPv4Interface(f"{addressing.host_address}/{addressing.prefixlen}").network
            if not any(subnet.overlaps(network) for network in used):
                break
        name = f"fw-{os.getpid()}-{suffix}"
        names.append(name)
        return InstanceNetwork.create(name, addressing)

    try:
        yield create
    finally:
        errors: list[Exception] = []
        for name in names:
            try:
                InstanceNetwork(name, None).remove()
            except NetworkError as error:
                errors.append(error)
        remaining = [line.split()[0] for line in run("ip", "netns", "list").splitlines() if line.strip()]
        if errors:
            raise errors[0]
        assert not [name for name in names if f"osvm-{name}" in remaining]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


# A server that accepts and closes connections. It is a plain socket server, because http.server
# looks up the bind address with getfqdn, which waits for a resolver the namespace cannot reach.
ACCEPT_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    server.accept()[0].close()
"""

CONNECT_CLIENT = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3])).close()
"""


def host_connects(address: str, port: int) -> bool:
    """Return whether a TCP connection from the host to address:port completes within CONNECT_TIMEOUT."""
    try:
        socket.create_connection((address, port), CONNECT_TIMEOUT).close()
    except OSError:
        return False
    return True


def namespace_connects(network: InstanceNetwork, address: str, port: int) -> bool:
    """Return whether a TCP connection from network's namespace to address:port completes."""
    result = subprocess.run(
        ["ip", "netns", "exec", network.netns_name, sys.executable, "-c", CONNECT_CLIENT,
         address, str(port), str(CONNECT_TIMEOUT)],
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return result.returncode == 0


def start_server(network: InstanceNetwork, port: int, processes: list[subprocess.Popen]) -> None:
    """Start ACCEPT_SERVER on the instance address in network's namespace and wait until the host reaches it."""
    address = network.addressing.instance_address
    process = subprocess.Popen(
        ["ip", "netns", "exec", network.netns_name, sys.executable, "-c", ACCEPT_SERVER, address, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes.append(process)
    deadline = time.monotonic() + 15
    while not host_connects(address, port):
        assert process.poll() is None, f"server in {network.netns_name} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"server in {network.netns_name} did not listen within 15 s"
        time.sleep(0.1)


@pytest.fixture
def server_port() -> int:
    # Each namespace has its own port space, so a fixed port cannot collide with servers outside it.
    return 20000 + os.getpid() % 20000


def host_tables() -> str:
    return run("nft", "list", "tables")


@pytest.mark.root
def test_ingress_blocks_unlisted_port(networks, processes, server_port):
    network = networks("b")
    neighbor = networks("a")
    start_server(network, server_port, processes)
    start_server(neighbor, server_port, processes)
    address = network.addressing.instance_address
    wall = NamespaceFirewall(network.netns_name)

    wall.apply([IngressRule(server_port + 1)], [])
    try:
        assert not host_connects(address, server_port)
        assert wall.dropped_packets() > 0
        # The neighbor namespace has no firewall.
        assert host_connects(neighbor.addressing.instance_address, server_port)
    finally:
        wall.remove()


@pytest.mark.root
def test_ingress_source_rule(networks, processes, server_port):
    network = networks("b")
    start_server(network, server_port, processes)
    address = network.addressing.instance_address
    host_address = network.addressing.host_address
    wall = NamespaceFirewall(network.netns_name)

    try:
        wall.apply([IngressRule(server_port, source=host_address)], [])
        assert host_connects(address, server_port)

        wall.apply([IngressRule(server_port, source=f"{host_address}/30")], [])
        assert host_connects(address, server_port)

        wall.apply([IngressRule(server_port, source=OTHER_SOURCE)], [])
        assert not host_connects(address, server_port)

        wall.apply([IngressRule(server_port)], [])
        assert host_connects(address, server_port)
    finally:
        wall.remove()


@pytest.mark.root
def test_egress_only_when_allowed(networks):
    network = networks("b")
    host_address = network.addressing.host_address
    wall = NamespaceFirewall(network.netns_name)
    # A listening socket completes the handshake from its backlog, so nothing needs to accept.
    listener = socket.create_server((host_address, 0))
    port = listener.getsockname()[1]

    try:
        assert namespace_connects(network, host_address, port)

        wall.apply([], [])
        assert not namespace_connects(network, host_address, port)

        wall.apply([], [EgressRule(host_address, port)])
        assert namespace_connects(network, host_address, port)

        wall.apply([], [EgressRule(f"{host_address}/30")])
        assert namespace_connects(network, host_address, port)

        wall.apply([], [EgressRule(host_address, port + 1 if port < 65535 else port - 1)])
        assert not namespace_connects(network, host_address, port)

        wall.apply([], [EgressRule(OTHER_SOURCE, port)])
        assert not namespace_connects(network, host_address, port)
    finally:
        wall.remove()
        listener.close()


@pytest.mark.root
def test_loopback_stays_open(networks, processes, server_port):
    network = networks("b")
    wall = NamespaceFirewall(network.netns_name)
    process = subprocess.Popen(
        ["ip", "netns", "exec", network.netns_name, sys.executable, "-c", ACCEPT_SERVER, "127.0.0.1", str(server_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes.append(process)

    wall.apply([], [])
    try:
        deadline = time.monotonic() + 15
        while not namespace_connects(network, "127.0.0.1", server_port):
            assert process.poll() is None, f"loopback server exited with {process.returncode}"
            assert time.monotonic() < deadline, "loopback server did not accept within 15 s"
            time.sleep(0.1)
    finally:
        wall.remove()


@pytest.mark.root
def test_remove_restores_access(networks, processes, server_port):
    network = networks("b")
    start_server(network, server_port, processes)
    address = network.addressing.instance_address
    wall = NamespaceFirewall(network.netns_name)

    wall.apply([], [])
    assert not host_connects(address, server_port)

    wall.remove()

    assert host_connects(address, server_port)
    assert wall.rules() == {}
    assert wall.dropped_packets() == 0
    wall.remove()  # idempotent


@pytest.mark.root
def test_table_only_in_namespace(networks):
    network = networks("b")
    wall = NamespaceFirewall(network.netns_name)
    tables_before = host_tables()

    wall.apply([IngressRule(8545)], [EgressRule("10.0.0.0/8", 443)])
    try:
        namespace_tables = run("ip", "netns", "exec", network.netns_name, "nft", "list", "tables")
        assert "table inet osvm" in namespace_tables
        assert "table inet osvm" not in host_tables()
        assert host_tables() == tables_before

        listing = wall.rules()
        chains = [item["chain"] for item in listing["nftables"] if "chain" in item]
        assert sorted((chain["name"], chain["policy"]) for chain in chains) == [
            ("forward", "drop"), ("input", "drop"), ("output", "drop"),
        ]
        rule_count = sum(1 for item in listing["nftables"] if "rule" in item)
        # input and output each have 4 common rules, one listed rule and a final drop. forward has
        # 3 common rules (no loopback), both listed rules and a final drop.
        assert rule_count == 6 + 6 + 6
    finally:
        wall.remove()

    assert host_tables() == tables_before


@pytest.mark.root
def test_apply_twice_replaces_rules(networks):
    network = networks("b")
    wall = NamespaceFirewall(network.netns_name)

    try:
        wall.apply([IngressRule(1000), IngressRule(1001)], [])
        wall.apply([IngressRule(2000)], [])

        text = run("ip", "netns", "exec", network.netns_name, "nft", "list", "table", "inet", "osvm")
        assert "tcp dport 2000 accept" in text
        assert "tcp dport 1000" not in text
        assert text.count("chain input") == 1
    finally:
        wall.remove()


@pytest.mark.root
def test_apply_failure_keeps_previous(networks, monkeypatch):
    network = networks("b")
    wall = NamespaceFirewall(network.netns_name)
    valid_ruleset = build_ruleset

    def invalid_ruleset(ingress, egress):
        document = valid_ruleset(ingress, egress)
        # nft rejects the unknown key, and the whole transaction with it.
        document["nftables"].append({"add": {"rule": {
            "family": "inet", "table": "osvm", "chain": "input", "expr": [{"no-such-statement": None}],
        }}})
        return document

    wall.apply([IngressRule(3000)], [])
    try:
        monkeypatch.setattr(firewall, "build_ruleset", invalid_ruleset)
        with pytest.raises(FirewallError) as raised:
            wall.apply([IngressRule(4000)], [])

        assert raised.value.netns_name == network.netns_name
        assert network.netns_name in str(raised.value)
        assert raised.value.stderr
        assert raised.value.stderr in str(raised.value)
        text = run("ip", "netns", "exec", network.netns_name, "nft", "list", "table", "inet", "osvm")
        assert "tcp dport 3000 accept" in text
        assert "tcp dport 4000" not in text
    finally:
        monkeypatch.undo()
        wall.remove()


@pytest.mark.root
def test_rejects_host_namespace(root_with_nft, monkeypatch):
    # /run/netns/NAME is made a bind mount of this process's own namespace. nft is replaced by a
    # stub, so that even a broken check could not change the host's ruleset.
    netns_name = f"osvm-fw-{os.getpid()}-host"
    calls: list[list[str]] = []

    def record_run(command, **kwargs):
        calls.append(command)
        raise AssertionError(f"nft must not run in the host namespace: {command}")

    run("ip", "netns", "attach", netns_name, str(os.getpid()))
    try:
        monkeypatch.setattr(firewall.subprocess, "run", record_run)
        wall = NamespaceFirewall(netns_name)

        with pytest.raises(FirewallError, match="never changes the host's ruleset"):
            wall.apply([], [])
        with pytest.raises(FirewallError, match="never changes the host's ruleset"):
            wall.remove()
        with pytest.raises(FirewallError, match="never changes the host's ruleset"):
            wall.rules()

        assert calls == []
    finally:
        monkeypatch.undo()
        subprocess.run(["ip", "netns", "delete", netns_name], capture_output=True)

    assert not os.path.lexists(f"/run/netns/{netns_name}")


# A guest behind the namespace, connected as a VM on its tap device is. A second namespace is
# the guest, linked by a veth pair whose end in the instance namespace is named tap0, so the
# forward chain and table ip osvm-guest are checked in the kernel without booting a VM.

GUEST_ADDRESS = "10.0.2.15"


@pytest.fixture
def guest_namespace(networks) -> Iterator[tuple[InstanceNetwork, str]]:
    network = networks("g")
    guest = f"osvm-fwguest-{os.getpid()}"
    try:
        run("ip", "netns", "add", guest)
        run("ip", "link", "add", "tap0", "netns", network.netns_name, "type", "veth", "peer", "name", "eth0", "netns", guest)
        run("ip", "-n", network.netns_name, "addr", "add", "10.0.2.2/24", "dev", "tap0")
        run("ip", "-n", network.netns_name, "link", "set", "tap0", "up")
        run("ip", "-n", guest, "addr", "add", f"{GUEST_ADDRESS}/24", "dev", "eth0")
        run("ip", "-n", guest, "link", "set", "eth0", "up")
        run("ip", "-n", guest, "link", "set", "lo", "up")
        run("ip", "-n", guest, "route", "add", "default", "via", "10.0.2.2")
        run("ip", "netns", "exec", network.netns_name, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        yield network, guest
    finally:
        subprocess.run(["ip", "netns", "del", guest], capture_output=True)


def start_guest_server(guest: str, port: int, processes: list[subprocess.Popen]) -> None:
    process = subprocess.Popen(
        ["ip", "netns", "exec", guest, sys.executable, "-c", ACCEPT_SERVER, GUEST_ADDRESS, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes.append(process)
    deadline = time.monotonic() + 15
    while subprocess.run(
        ["ip", "netns", "exec", guest, sys.executable, "-c", CONNECT_CLIENT, GUEST_ADDRESS, str(port), "1"],
        capture_output=True,
    ).returncode != 0:
        assert process.poll() is None, f"server in {guest} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"server in {guest} did not listen within 15 s"
        time.sleep(0.1)


PEER_ADDRESS_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
connection, peer = server.accept()
print(peer[0], flush=True)
"""


@pytest.mark.root
def test_guest_forwarding_follows_the_rules(guest_namespace, processes, server_port):
    network, guest = guest_namespace
    wall = NamespaceFirewall(network.netns_name)
    host_address = network.addressing.host_address
    instance_address = network.addressing.instance_address
    allowed, forwarded_only = server_port, server_port + 1
    wall.apply([IngressRule(allowed, host_address)], [EgressRule(host_address, allowed)])
    wall.apply_guest_forwarding(instance_address, GUEST_ADDRESS, [allowed, forwarded_only])
    start_guest_server(guest, allowed, processes)
    start_guest_server(guest, forwarded_only, processes)

    # Ingress: the instance address reaches the guest only on a port the ingress rules list.
    assert host_connects(instance_address, allowed)
    assert not host_connects(instance_address, forwarded_only)

    # Egress: the guest reaches the host on the allowed port, and arrives from the instance address.
    server = subprocess.Popen(
        [sys.executable, "-c", PEER_ADDRESS_SERVER, host_address, str(allowed)], stdout=subprocess.PIPE, text=True,
    )
    processes.append(server)
    assert server.stdout.readline().strip() == "ready"
    client = ["ip", "netns", "exec", guest, sys.executable, "-c", CONNECT_CLIENT, host_address]
    assert subprocess.run([*client, str(allowed), "2"], capture_output=True).returncode == 0
    assert server.stdout.readline().strip() == instance_address
    assert subprocess.run([*client, str(forwarded_only), "1"], capture_output=True).returncode != 0
    assert wall.dropped_packets() > 0

    text = run("ip", "netns", "exec", network.netns_name, "nft", "list", "table", "ip", "osvm-guest")
    assert "dnat to 10.0.2.15" in text
    assert "masquerade" in text
