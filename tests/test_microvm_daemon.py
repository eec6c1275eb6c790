"""End-to-end tests of runtime "microvm" through the real daemon and the `osvm` command line.

Each test runs its own daemon (the `osvm_stopped` fixture of conftest.py, whose teardown fails the
test on any process, cgroup, network namespace or veth interface left behind). The component is a
small static C HTTP and JSON-RPC server that reports the variable VERSION from its environment,
booted in a QEMU microVM (TCG where KVM cannot run a stock guest kernel).

Images are built once per module into the shared test image cache (OSVM_TEST_IMAGE_CACHE, see
test_microvm_support.py), and each daemon's <state_dir>/images is a symlink to that cache, so no
test waits for an image build.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from e2e import PYTHON, Osvm, http_request, is_alive, link_names, netns_names, read_process, wait_for
from osvm.config.models import ImageSpec
from osvm.images import build_image
from osvm.runtimes.microvm import detect_accelerator
from osvm.runtimes.netns import HOST_IFNAME_PREFIX, NETNS_PREFIX, short_id
from test_microvm_support import IMAGE_CACHE, free_port, require_guest_kernel, require_qemu
from test_rollout import LoadLoop

pytestmark = [
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="runtime microvm needs qemu-system-x86_64 (Debian package qemu-system-x86)",
    ),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="the test component is compiled with gcc, which is not installed (Debian package gcc)"),
]

# Generous deadlines for TCG boots on a loaded 2-core host. They bound a hung test and are never
# asserted as performance limits.
BOOT_TIMEOUT = 240.0
ROLLOUT_TIMEOUT = 600.0

COMPONENT = "web"

# A static HTTP/1.1 server on $OSVM_PORT_HTTP, one connection at a time, closing each after its
# response. GET /health returns "ok", GET /version returns $VERSION, and POST replies to any
# JSON-RPC call with $VERSION as the result and the request's numeric id.
SERVER_SOURCE = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>

#define REQUEST_MAX 16384

/* Read one request into buffer, its headers and the body that Content-Length announces.
   Returns the number of bytes read, or -1 when the client closed early or sent too much. */
static ssize_t read_request(int client, char *buffer, size_t size, char **body) {
    size_t total = 0;
    char *headers_end = NULL;
    while (headers_end == NULL) {
        if (total + 1 >= size)
            return -1;
        ssize_t count = read(client, buffer + total, size - 1 - total);
        if (count <= 0)
            return -1;
        total += (size_t)count;
        buffer[total] = '\0';
        headers_end = strstr(buffer, "\r\n\r\n");
    }
    *body = headers_end + 4;
    size_t length = 0;
    for (char *line = strstr(buffer, "\r\n"); line != NULL && line < headers_end; line = strstr(line + 2, "\r\n")) {
        if (strncasecmp(line + 2, "Content-Length:", 15) == 0)
            length = strtoul(line + 17, NULL, 10);
    }
    size_t request_length = (size_t)(*body - buffer) + length;
    if (request_length >= size)
        return -1;
    while (total < request_length) {
        ssize_t count = read(client, buffer + total, request_length - total);
        if (count <= 0)
            return -1;
        total += (size_t)count;
    }
    buffer[total] = '\0';
    return (ssize_t)total;
}

/* Copy the digits of the JSON member "id" into id, or "null" when there is no numeric id. */
static void request_id(const char *body, char *id, size_t size) {
    snprintf(id, size, "null");
    const char *member = strstr(body, "\"id\"");
    if (member == NULL)
        return;
    member += 4;
    while (*member == ' ' || *member == ':')
        member++;
    size_t length = strspn(member, "0123456789");
    if (length > 0 && length < size)
        snprintf(id, size, "%.*s", (int)length, member);
}

static void respond(int client, int status, const char *type, const char *body) {
    char response[1024];
    int length = snprintf(response, sizeof response,
                          "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%s",
                          status, status == 200 ? "OK" : "Not Found", type, strlen(body), body);
    for (int sent = 0; sent < length;) {
        ssize_t count = write(client, response + sent, (size_t)(length - sent));
        if (count <= 0)
            return;
        sent += (int)count;
    }
}

int main(void) {
    const char *port_text = getenv("OSVM_PORT_HTTP");
    const char *version = getenv("VERSION");
    int port = port_text ? atoi(port_text) : 8080;
    if (version == NULL)
        version = "unset";
    signal(SIGPIPE, SIG_IGN);

    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int enable = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &enable, sizeof enable);
    struct sockaddr_in address = {0};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = INADDR_ANY;
    if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, 64) != 0) {
        perror("bind");
        return 1;
    }
    printf("listening on %d with version %s\n", port, version);
    fflush(stdout);

    static char request[REQUEST_MAX];
    for (;;) {
        int client = accept(listener, NULL, NULL);
        if (client < 0)
            continue;
        /* A client that stops sending must not block the others for long. */
        struct timeval timeout = {10, 0};
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
        char *body = NULL;
        if (read_request(client, request, sizeof request, &body) < 0) {
            close(client);
            continue;
        }
        if (strncmp(request, "GET /health ", 12) == 0) {
            respond(client, 200, "text/plain", "ok");
        } else if (strncmp(request, "GET /version ", 13) == 0) {
            respond(client, 200, "text/plain", version);
        } else if (strncmp(request, "POST ", 5) == 0) {
            char id[24];
            char result[256];
            request_id(body, id, sizeof id);
            snprintf(result, sizeof result, "{\"jsonrpc\":\"2.0\",\"id\":%s,\"result\":\"%s\"}", id, version);
            respond(client, 200, "application/json", result);
        } else {
            respond(client, 404, "text/plain", "not found");
        }
        close(client);
    }
}
"""

HTTP_PROBE = {
    "type": "http",
    "port": "http",
    "path": "/health",
    "interval": "0.5s",
    "startup_interval": "0.25s",
    "timeout": "5s",
    "failure_threshold": 3,
}
# Runs in the guest through the agent with the component's environment: the server must report
# the VERSION that the guest was started with.
EXEC_PROBE = {
    "type": "exec",
    "command": ["sh", "-c", 'wget -q -O - "http://127.0.0.1:$OSVM_PORT_HTTP/version" | grep -qx "$VERSION"'],
    "interval": "2s",
    "startup_interval": "0.5s",
    "timeout": "20s",
    "failure_threshold": 3,
}


@pytest.fixture(scope="module")
def server_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compile the test server and build its images (initramfs and ext4) into the shared cache."""
    require_qemu()
    require_guest_kernel()
    directory = tmp_path_factory.mktemp("vm-server")
    source = directory / "vm-server.c"
    source.write_text(SERVER_SOURCE)
    binary = directory / "vm-server"
    subprocess.run(["gcc", "-static", "-O2", "-s", "-Wall", "-o", str(binary), str(source)], check=True)
    for image_format in ("initramfs", "ext4"):
        build_image(ImageSpec(kind="binary", path=str(binary), format=image_format), Path("/"), IMAGE_CACHE)
    return binary


@pytest.fixture
def vm_osvm(osvm_stopped: Osvm, server_binary: Path) -> Osvm:
    """A daemon whose image cache is the shared test cache."""
    osvm_stopped.state_dir.mkdir(parents=True, exist_ok=True)
    (osvm_stopped.state_dir / "images").symlink_to(IMAGE_CACHE)
    osvm_stopped.start_daemon()
    return osvm_stopped


def write_vm_deployment(
    osvm: Osvm,
    binary: Path,
    endpoint_port: int,
    image_format: str = "initramfs",
    network: str = "host",
    allow_egress: list[str] | None = None,
    vm: dict[str, Any] | None = None,
    tls: dict[str, Any] | None = None,
) -> Path:
    component: dict[str, Any] = {
        "runtime": "microvm",
        # The host path of the image's binary, which the runtime maps to /app/vm-server in the guest.
        "command": [str(binary)],
        "ports": {"http": 0},
        "stop_grace_period": "3s",
        "env": {"VERSION": "1"},
        "network": {"mode": network, "allow_egress": allow_egress or []},
        "vm": {"vcpus": 1, "memory": "256MiB", "accel": "auto", **(vm or {})},
        "image": {"kind": "binary", "path": str(binary), "format": image_format},
        "endpoint": {
            "listen": f"127.0.0.1:{endpoint_port}",
            "mode": "http",
            "drain_timeout": "5s",
            "queue_timeout": "30s",
        },
        "update": {"min_healthy_time": "1s", "healthy_deadline": "180s", "post_promotion_window": "2s"},
        "restart": {"backoff_initial": "0.5s"},
        "probes": [HTTP_PROBE, EXEC_PROBE],
    }
    if tls is not None:
        component["tls"] = tls
    return osvm.write_deployment({COMPONENT: component}, name="vm-e2e")


def up(osvm: Osvm, path: Path) -> subprocess.CompletedProcess[str]:
    return osvm.cli("up", str(path), "--timeout", str(int(BOOT_TIMEOUT)), timeout=BOOT_TIMEOUT + 60)


def rpc_call(port: int, request_id: int = 7) -> dict[str, Any]:
    status, body = http_request(
        f"http://127.0.0.1:{port}/", {"jsonrpc": "2.0", "id": request_id, "method": "version", "params": []}
    )
    assert status == 200, body
    return json.loads(body)


def endpoint_version(port: int) -> str:
    status, body = http_request(f"http://127.0.0.1:{port}/version")
    assert status == 200, body
    return body.decode()


def single_instance(status: dict[str, Any]) -> dict[str, Any]:
    component = next(item for item in status["components"] if item["name"] == COMPONENT)
    assert len(component["instances"]) == 1, component["instances"]
    return component["instances"][0]


def qemu_processes(osvm: Osvm) -> list[str]:
    """Return the QEMU processes of this daemon's state directory, described for messages."""
    return [process.describe() for process in osvm.processes() if "qemu-system" in " ".join(process.cmdline)]


def is_qemu(pid: int) -> bool:
    process = read_process(pid)
    return process is not None and any("qemu-system" in part for part in process.cmdline)


def instance_files(osvm: Osvm, pattern: str) -> list[Path]:
    found: list[Path] = []
    for directory in ("instances", "data"):
        found += sorted((osvm.state_dir / directory).rglob(pattern))
    return found


# --- tests -----------------------------------------------------------------------------------


def test_vm_component_serves_through_endpoint(vm_osvm: Osvm, server_binary: Path) -> None:
    port = free_port()
    path = write_vm_deployment(vm_osvm, server_binary, port)

    up(vm_osvm, path)

    status = vm_osvm.cli_json("status")
    component = next(item for item in status["components"] if item["name"] == COMPONENT)
    assert component["status"] == "running", component
    instance = single_instance(status)
    assert instance["runtime"] == "microvm"
    assert instance["state"] == "running"
    assert instance["health"] == "healthy"
    assert is_qemu(instance["pid"]), read_process(instance["pid"])
    probes = {probe["type"]: probe for probe in instance["probes"]}
    assert probes["http"]["state"] == "healthy", probes["http"]
    assert probes["exec"]["state"] == "healthy", probes["exec"]
    assert probes["exec"]["ok"] is True, probes["exec"]

    accelerator = detect_accelerator("auto")[0].upper()
    started = [
        event for event in vm_osvm.cli_events()
        if event["kind"] == "instance.started" and event["instance"] == instance["id"]
    ]  # fmt: skip
    assert len(started) == 1, started
    assert "microVM" in started[0]["reason"]
    assert accelerator in started[0]["reason"]
    assert instance["vm"]["accelerator"].upper() == accelerator
    assert instance["vm"]["network"] == "user"
    assert instance["vm"]["memory_mib"] == 256
    table = vm_osvm.cli("status").stdout
    assert f"microvm/{accelerator}" in table

    reply = rpc_call(port, request_id=7)
    assert reply["result"] == "1"
    assert reply["id"] == 7

    logs = vm_osvm.cli("logs", COMPONENT).stdout
    assert "listening on" in logs
    assert "with version 1" in logs


def test_deploy_swaps_vm_without_failed_requests(vm_osvm: Osvm, server_binary: Path) -> None:
    port = free_port()
    up(vm_osvm, write_vm_deployment(vm_osvm, server_binary, port))
    blue = single_instance(vm_osvm.status())
    assert endpoint_version(port) == "1"

    with LoadLoop(port, clients=2) as keep_alive, LoadLoop(port, clients=1, keep_alive=False) as fresh:
        wait_for(lambda: keep_alive.result.sent > 0 and fresh.result.sent > 0, "the load loops to send requests")
        result = vm_osvm.cli(
            "deploy", COMPONENT, "--set", "env.VERSION=2", "--json", check=False, timeout=ROLLOUT_TIMEOUT
        )
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(lambda: "2" in keep_alive.result.versions[-5:], "a response of version 2 in the load loop")

    rollout = json.loads(result.stdout)["rollout"]
    assert rollout["state"] == "complete", rollout
    assert keep_alive.result.failed == 0, keep_alive.result.errors[:5]
    assert fresh.result.failed == 0, fresh.result.errors[:5]
    assert keep_alive.result.versions[-1] == "2"
    assert endpoint_version(port) == "2"
    assert rpc_call(port)["result"] == "2"

    component = vm_osvm.component(COMPONENT)
    assert component["revision"] == 2
    green = single_instance(vm_osvm.status())
    assert green["id"] != blue["id"]
    assert green["revision"] == 2
    assert green["runtime"] == "microvm"
    wait_for(lambda: not is_alive(blue["pid"]), f"QEMU pid {blue['pid']} of the old revision to exit", 60)


def test_killed_qemu_is_restarted(vm_osvm: Osvm, server_binary: Path) -> None:
    port = free_port()
    up(vm_osvm, write_vm_deployment(vm_osvm, server_binary, port))
    before = single_instance(vm_osvm.status())
    assert is_qemu(before["pid"]), read_process(before["pid"])
    # As root the recorded pid is bwrap's, which runs QEMU in its mount namespace: kill QEMU itself.
    qemu = int((vm_osvm.state_dir / "instances" / before["id"] / "qemu.pid").read_text())
    assert is_qemu(qemu), read_process(qemu)

    os.kill(qemu, signal.SIGKILL)

    def healthy_again() -> dict[str, Any] | None:
        instance = single_instance(vm_osvm.status())
        if instance["pid"] not in (None, before["pid"]) and instance["health"] == "healthy":
            return instance
        return None

    after = wait_for(healthy_again, "the instance to run healthy with a new QEMU", BOOT_TIMEOUT)
    assert after["id"] == before["id"]
    assert after["restarts"] == before["restarts"] + 1
    assert is_qemu(after["pid"]), read_process(after["pid"])
    assert not is_alive(before["pid"])
    assert not is_alive(qemu)

    backoff = [
        event for event in vm_osvm.cli_events()
        if event["kind"] == "instance.backoff" and event["instance"] == before["id"]
    ]  # fmt: skip
    assert len(backoff) == 1, backoff
    assert "QEMU was killed by SIGKILL" in backoff[0]["reason"]
    assert "restarting in" in backoff[0]["reason"]
    assert rpc_call(port)["result"] == "1"


def test_down_removes_vm_resources(vm_osvm: Osvm, server_binary: Path) -> None:
    # Network mode "namespace" and an ext4 root give the VM a namespace, a veth pair and an
    # overlay, so there is something for `osvm down` to remove.
    port = free_port()
    up(vm_osvm, write_vm_deployment(vm_osvm, server_binary, port, image_format="ext4", network="namespace"))
    instance = single_instance(vm_osvm.status())
    instance_dir = vm_osvm.state_dir / "instances" / instance["id"]
    assert rpc_call(port)["result"] == "1"
    assert instance["address"] != "127.0.0.1"
    assert instance["vm"]["network"] == "tap"
    assert (instance_dir / "root.qcow2").exists()
    assert sorted(path.name for path in instance_dir.glob("*.sock")) == [
        "agent.sock", "exec-port.sock", "exec.sock", "qmp.sock", "vsock-port.sock", "vsock.sock",
    ]
    assert NETNS_PREFIX + instance["id"] in netns_names()
    assert HOST_IFNAME_PREFIX + short_id(instance["id"]) in link_names()
    assert "tap0" in link_names(NETNS_PREFIX + instance["id"])
    assert qemu_processes(vm_osvm)

    vm_osvm.cli("down", "--daemon")
    assert vm_osvm.daemon is not None
    vm_osvm.daemon.wait(timeout=60)

    assert qemu_processes(vm_osvm) == []
    assert NETNS_PREFIX + instance["id"] not in netns_names()
    assert HOST_IFNAME_PREFIX + short_id(instance["id"]) not in link_names()
    assert instance_files(vm_osvm, "*.qcow2") == []
    assert instance_files(vm_osvm, "*.sock") == []


def test_namespace_vm_egress_follows_firewall(vm_osvm: Osvm, server_binary: Path) -> None:
    # The guest's tap device is in the instance's namespace, so its outbound connections are
    # forwarded through the namespace's firewall: only allow_egress destinations are reached, and
    # they see the instance address, as they would from a process instance.
    allowed_port = free_port()
    denied_port = free_port()
    path = write_vm_deployment(
        vm_osvm, server_binary, free_port(), network="namespace", allow_egress=[f"{vm_osvm.subnet_pool}:{allowed_port}"]
    )
    up(vm_osvm, path)
    instance = single_instance(vm_osvm.status())
    gateway = str(ipaddress.IPv4Address(instance["address"]) - 1)
    exec_socket = vm_osvm.state_dir / "instances" / instance["id"] / "exec.sock"

    with LineListener(gateway, allowed_port) as allowed, LineListener(gateway, denied_port) as denied:
        reached = run_in_vm(exec_socket, f"echo allowed | nc -w 5 {gateway} {allowed_port}")
        blocked = run_in_vm(exec_socket, f"echo denied | nc -w 5 {gateway} {denied_port}")

    assert reached.returncode == 0, reached.stdout + reached.stderr
    assert allowed.lines == ["allowed"]
    assert allowed.peers == [instance["address"]]
    assert blocked.returncode != 0, blocked.stdout + blocked.stderr
    assert denied.lines == []


def test_guest_without_ready_is_restarted(vm_osvm: Osvm, server_binary: Path) -> None:
    # With cat as the initramfs's init, the kernel boots and then waits on the console forever, so
    # the agent never reports READY.
    path = write_vm_deployment(
        vm_osvm, server_binary, free_port(), vm={"kernel_args": ["rdinit=/bin/cat"], "boot_timeout": "3s"}
    )
    vm_osvm.cli("up", str(path), "--detach")

    def timed_out_twice() -> list[dict[str, Any]] | None:
        events = [event for event in vm_osvm.events(COMPONENT) if event["kind"] == "instance.backoff"]
        return events if len(events) >= 2 else None

    backoff = wait_for(timed_out_twice, "two restarts after boot timeouts", BOOT_TIMEOUT)
    assert "did not report READY within 3 s" in backoff[0]["reason"]
    kinds = [event["kind"] for event in vm_osvm.events(COMPONENT)]
    assert "instance.boot_timeout" in kinds
    assert "instance.healthy" not in kinds
    instance = single_instance(vm_osvm.status())
    assert instance["health"] != "healthy"


def test_vm_component_gets_certificate(vm_osvm: Osvm, server_binary: Path) -> None:
    vm_osvm.cli("ca", "init")
    # The default action of SIGWINCH is to ignore it, and the server keeps that, so the signal does
    # not stop it. The reload command runs in the guest and copies the certificate that it finds there.
    tls = {
        "reload_signal": "SIGWINCH",
        "reload_command": ["sh", "-c", 'cat "$OSVM_TLS_CERT" > /data/reloaded.pem'],
    }
    up(vm_osvm, write_vm_deployment(vm_osvm, server_binary, free_port(), tls=tls))
    instance = single_instance(vm_osvm.status())
    tls_dir = vm_osvm.state_dir / "data" / instance["id"] / "tls"
    exec_socket = vm_osvm.state_dir / "instances" / instance["id"] / "exec.sock"

    first = (tls_dir / "cert.pem").read_text()
    assert guest_file(exec_socket, "$OSVM_TLS_CERT") == first
    assert guest_file(exec_socket, "$OSVM_TLS_KEY") == (tls_dir / "key.pem").read_text()
    assert guest_file(exec_socket, "$OSVM_TLS_CA") == (tls_dir / "ca.pem").read_text()
    key_mode = run_in_vm(exec_socket, 'stat -c %a "$OSVM_TLS_KEY"')
    assert key_mode.stdout == "600\n", key_mode.stdout + key_mode.stderr

    vm_osvm.cli("ca", "renew", COMPONENT)

    def renewal_event() -> dict[str, Any] | None:
        for event in vm_osvm.events(COMPONENT):
            if event["kind"] == "certificate.renewed" and event["instance"] == instance["id"]:
                return event
        return None

    event = wait_for(renewal_event, "a certificate.renewed event of the VM instance")
    assert "copied the files to /run/osvm/tls in the VM" in event["reason"]
    assert "sent SIGWINCH" in event["reason"]
    assert "reload command exited with status 0" in event["reason"]
    second = (tls_dir / "cert.pem").read_text()
    assert second != first
    assert guest_file(exec_socket, "$OSVM_TLS_CERT") == second
    # The event comes after the reload command has finished, so its copy is already there.
    assert guest_file(exec_socket, "/data/reloaded.pem") == second
    assert single_instance(vm_osvm.status())["pid"] == instance["pid"]


def run_in_vm(exec_socket: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script in the VM through the agent's exec socket, as an operator would."""
    return subprocess.run(
        [str(PYTHON), "-m", "osvm.runtimes.microvm.guest_exec", "--socket", str(exec_socket), "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )


def guest_file(exec_socket: Path, path: str) -> str:
    """Return a file's content in the VM. The path may name a variable of the component's environment."""
    result = run_in_vm(exec_socket, f'cat "{path}"')
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


class LineListener:
    """A TCP listener that stores the first line of each connection, then closes it.

    Closing matters because busybox nc exits only when the other side closes.
    """

    def __init__(self, host: str, port: int):
        self.server = socket.create_server((host, port))
        self.server.settimeout(0.2)
        self.lines: list[str] = []
        # The source address of each connection, in the order the lines arrived.
        self.peers: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "LineListener":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.server.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, peer = self.server.accept()
            except TimeoutError:
                continue
            self.peers.append(peer[0])
            with connection:
                connection.settimeout(10.0)
                data = b""
                try:
                    while b"\n" not in data and (chunk := connection.recv(4096)):
                        data += chunk
                except TimeoutError:
                    pass
            self.lines.append(data.decode(errors="replace").split("\n", 1)[0])
