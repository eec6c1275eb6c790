"""Tests of osvm.runtimes.netns.

Tests marked root create real network namespaces and veth pairs and send
traffic only to addresses inside them. They draw addresses from TEST_POOL,
at an offset from the test process id, and skip subnets that the host
already uses, so that they do not collide with other tests on the host.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from osvm.runtimes import netns
from osvm.runtimes.netns import InstanceNetwork, NetworkError, VethAddressing, addressing_for

TEST_POOL = "10.254.0.0/16"


# Addressing.


def test_addressing_first_subnets():
    assert addressing_for(0) == VethAddressing("10.213.0.1", "10.213.0.2", 30)
    assert addressing_for(1) == VethAddressing("10.213.0.5", "10.213.0.6", 30)
    assert addressing_for(64) == VethAddressing("10.213.1.1", "10.213.1.2", 30)


def test_addressing_last_subnet():
    assert addressing_for(16383) == VethAddressing("10.213.255.253", "10.213.255.254", 30)


def test_addressing_pool_exhausted():
    with pytest.raises(ValueError, match="exhausted"):
        addressing_for(16384)
    with pytest.raises(ValueError, match="exhausted"):
        addressing_for(4, pool="192.168.7.0/28")


def test_addressing_custom_pool():
    assert addressing_for(3, pool="192.168.7.0/28") == VethAddressing("192.168.7.13", "192.168.7.14", 30)
    assert addressing_for(0, pool="192.168.7.4/30") == VethAddressing("192.168.7.5", "192.168.7.6", 30)


def test_addressing_invalid_input():
    cases = [
        (-1, "10.213.0.0/16"),
        (0, "10.213.0.0/31"),
        (0, "10.213.0.1/16"),  # host bits set
        (0, "fd00::/64"),
        (0, "not-a-network"),
    ]
    for index, pool in cases:
        with pytest.raises(ValueError):
            addressing_for(index, pool)


def test_host_ifname_short_and_stable():
    names = ["a", "validator-1", "x" * 128]
    ifnames = [InstanceNetwork(name, None).host_ifname for name in names]

    for ifname in ifnames:
        assert len(ifname) <= 15
        assert ifname.startswith("ov-")
    assert len(set(ifnames)) == len(names)
    assert InstanceNetwork("validator-1", None).host_ifname == ifnames[1]


def test_network_paths():
    network = InstanceNetwork("rpc-0", None)

    assert network.netns_name == "osvm-rpc-0"
    assert network.netns_path == "/run/netns/osvm-rpc-0"


def test_create_rejects_invalid_name():
    for name in ["", "..", "a/b", "-x", "x" * 129]:
        with pytest.raises(ValueError, match="invalid instance name"):
            InstanceNetwork.create(name, addressing_for(0))


def test_create_rejects_invalid_addressing():
    cases = [
        VethAddressing("10.213.0.1", "10.213.0.6", 30),  # different subnets
        VethAddressing("10.213.0.1", "10.213.0.1", 30),
        VethAddressing("10.213.0.1", "not-an-address", 30),
        VethAddressing("10.213.0.1", "10.213.0.2", 33),
    ]
    for addressing in cases:
        with pytest.raises(ValueError, match="invalid addressing"):
            InstanceNetwork.create("addressing-check", addressing)


# Real namespaces and veth pairs.


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def host_networks() -> list[ipaddress.IPv4Network]:
    networks = []
    for line in run("ip", "-4", "-o", "addr", "show").splitlines():
        # Format: index: ifname inet address/prefixlen ...
        fields = line.split()
        networks.append(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]).network)
    return networks


@pytest.fixture
def root_with_ip():
    if os.geteuid() != 0:
        pytest.skip("network namespace tests need root to create namespaces and veth pairs")
    if shutil.which("ip") is None:
        pytest.skip("network namespace tests need the ip command from iproute2")


@pytest.fixture
def networks(root_with_ip):
    """Create instance networks with free test addresses, and remove every
    one afterwards, also on failure."""
    names: list[str] = []
    used = host_networks()
    next_index = (os.getpid() * 8) % 16384

    def create(suffix: str) -> InstanceNetwork:
        nonlocal next_index
        while True:
            addressing = addressing_for(next_index % 16384, TEST_POOL)
            next_index += 1
            subnet = ipaddress.IPv4Interface(f"{addressing.host_address}/{addressing.prefixlen}").network
            if not any(subnet.overlaps(network) for network in used):
                break
        name = f"test-{os.getpid()}-{suffix}"
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
        if errors:
            raise errors[0]


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def netns_names() -> list[str]:
    # Lines look like "osvm-x" or "osvm-x (id: 0)".
    return [line.split()[0] for line in run("ip", "netns", "list").splitlines() if line.strip()]


def host_link_exists(ifname: str) -> bool:
    result = subprocess.run(["ip", "link", "show", "dev", ifname], capture_output=True)
    return result.returncode == 0


# The server of python -m http.server with server_bind() replaced, because
# the original calls socket.getfqdn() on the bind address. That reverse DNS
# lookup goes to the host's resolver, which the namespace cannot reach, and
# would delay the start by the resolver timeout.
HTTP_SERVER = """
import functools, http.server, socketserver, sys
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
address, port, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
Server((address, port), handler).serve_forever()
"""


def start_http_server(network: InstanceNetwork, directory, processes) -> int:
    """Start an http.server in network's namespace, bound to the instance
    address, and return its port once it accepts connections."""
    port = 8000 + os.getpid() % 1000
    assert network.addressing is not None
    process = subprocess.Popen(
        [
            "ip", "netns", "exec", network.netns_name,
            sys.executable, "-c", HTTP_SERVER,
            network.addressing.instance_address, str(port), str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    processes.append(process)
    deadline = time.monotonic() + 15
    while True:
        check = subprocess.run(
            ["ip", "netns", "exec", network.netns_name, sys.executable, "-c",
             f"import socket; socket.create_connection(({network.addressing.instance_address!r}, {port}), 1)"],
            capture_output=True,
        )  # fmt: skip
        if check.returncode == 0:
            return port
        assert process.poll() is None, f"http.server exited with {process.returncode}"
        assert time.monotonic() < deadline, "http.server did not start listening within 15 s"
        time.sleep(0.1)


@pytest.mark.root
def test_create_configures_both_sides(networks):
    network = networks("config")
    addressing = network.addressing

    host_addresses = run("ip", "-4", "-o", "addr", "show", "dev", network.host_ifname)
    instance_addresses = run("ip", "-n", network.netns_name, "-4", "-o", "addr", "show", "dev", "eth0")
    instance_links = run("ip", "-n", network.netns_name, "-o", "link", "show")
    default_route = run("ip", "-n", network.netns_name, "route", "show", "default")
    host_link = run("ip", "-o", "link", "show", "dev", network.host_ifname)

    assert network.netns_name in netns_names()
    assert os.path.exists(network.netns_path)
    assert f"inet {addressing.host_address}/30" in host_addresses
    assert "state UP" in host_link
    assert f"inet {addressing.instance_address}/30" in instance_addresses
    assert f"default via {addressing.host_address} dev eth0" in default_route
    lo_line = next(line for line in instance_links.splitlines() if ": lo:" in line)
    assert ",UP" in lo_line
    # eth0 and lo only: the peer was renamed and nothing else was moved in.
    assert len(instance_links.splitlines()) == 2


@pytest.mark.root
def test_host_reaches_instance_over_tcp(networks, processes, tmp_path):
    network = networks("tcp")
    (tmp_path / "hello.txt").write_text("hello from the instance\n")
    port = start_http_server(network, tmp_path, processes)

    connection = http.client.HTTPConnection(network.addressing.instance_address, port, timeout=5)
    try:
        connection.request("GET", "/hello.txt")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()

    assert response.status == 200
    assert body == b"hello from the instance\n"


@pytest.mark.root
def test_remove_leaves_no_netns_or_veth(networks):
    network = networks("remove")

    network.remove()

    assert network.netns_name not in netns_names()
    assert not os.path.lexists(network.netns_path)
    assert not host_link_exists(network.host_ifname)
    assert InstanceNetwork.open(network.name) is None
    assert network.name not in InstanceNetwork.list_names()
    network.remove()  # idempotent


@pytest.mark.root
def test_remove_with_process_inside(networks, processes, tmp_path):
    network = networks("busy")
    start_http_server(network, tmp_path, processes)

    network.remove()

    assert network.netns_name not in netns_names()
    assert not host_link_exists(network.host_ifname)


@pytest.mark.root
def test_create_twice_fails_cleanly(networks):
    first = networks("twice")

    with pytest.raises(NetworkError, match="already exists") as raised:
        InstanceNetwork.create(first.name, first.addressing)

    assert raised.value.step == "create network namespace"
    reopened = InstanceNetwork.open(first.name)
    assert reopened is not None
    assert reopened.addressing == first.addressing
    assert host_link_exists(first.host_ifname)


@pytest.mark.root
def test_open_reads_addressing(networks):
    network = networks("open")

    opened = InstanceNetwork.open(network.name)

    assert opened is not None
    assert opened.netns_path == network.netns_path
    assert opened.host_ifname == network.host_ifname
    assert opened.addressing == network.addressing
    assert InstanceNetwork.open(f"missing-{os.getpid()}") is None


@pytest.mark.root
def test_list_names_includes_created(networks):
    first = networks("list-a")
    second = networks("list-b")

    names = InstanceNetwork.list_names()

    assert first.name in names
    assert second.name in names
    assert names == sorted(names)


@pytest.mark.root
def test_failed_step_removes_everything(root_with_ip, monkeypatch):
    name = f"test-{os.getpid()}-fail"
    network = InstanceNetwork(name, None)
    peer_ifname = netns.PEER_IFNAME_PREFIX + netns.short_id(name)

    def fail(self, peer_ifname):
        raise NetlinkError(errno.EINVAL, "injected failure")

    monkeypatch.setattr(InstanceNetwork, "_configure_instance_side", fail)
    try:
        with pytest.raises(NetworkError, match="configure instance interface") as raised:
            InstanceNetwork.create(name, addressing_for(0, TEST_POOL))

        assert raised.value.step == "configure instance interface"
        assert network.netns_name not in netns_names()
        assert not host_link_exists(network.host_ifname)
        assert not host_link_exists(peer_ifname)
    finally:
        network.remove()


@pytest.mark.root
def test_existing_host_interface_fails(root_with_ip):
    name = f"test-{os.getpid()}-taken"
    network = InstanceNetwork(name, None)
    # A veth pair, because the dummy module may be missing.
    run("ip", "link", "add", network.host_ifname, "type", "veth", "peer", "name", f"ot-{netns.short_id(name)}")
    try:
        with pytest.raises(NetworkError, match="already exists") as raised:
            InstanceNetwork.create(name, addressing_for(0, TEST_POOL))

        assert raised.value.step == "create veth pair"
        assert network.netns_name not in netns_names()
        assert host_link_exists(network.host_ifname)
    finally:
        subprocess.run(["ip", "link", "del", network.host_ifname], capture_output=True)
        network.remove()
