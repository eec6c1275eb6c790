"""Shared pieces of the microVM and image tests (no tests here): the kernel cache, a test server, launch plans.

The kernel package and compiled agent are cached in OSVM_TEST_IMAGE_CACHE (default
/var/tmp/osvm-test-images), so only the first run downloads and unpacks the kernel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from osvm.config.models import Component, ImageSpec, VmSettings
from osvm.images.kernel import KernelError, fetch_kernel
from osvm.runtimes.base import LaunchPlan

IMAGE_CACHE = Path(os.environ.get("OSVM_TEST_IMAGE_CACHE", "/var/tmp/osvm-test-images"))

# A static HTTP server that returns a JSON-RPC result for every request, listening on $OSVM_PORT_HTTP.
SERVER_SOURCE = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>

int main(void) {
    const char *port_text = getenv("OSVM_PORT_HTTP");
    int port = port_text ? atoi(port_text) : 8080;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {0};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = INADDR_ANY;
    if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, 16) != 0) {
        perror("bind");
        return 1;
    }
    printf("listening on %d as %s\n", port, getenv("OSVM_INSTANCE"));
    fflush(stdout);
    for (;;) {
        int client = accept(listener, NULL, NULL);
        if (client < 0)
            continue;
        char request[4096];
        ssize_t ignored = read(client, request, sizeof request);
        (void)ignored;
        const char *body = "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":\"pong\"}";
        char response[512];
        int length = snprintf(response, sizeof response,
                              "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                              "Connection: close\r\n\r\n%s", strlen(body), body);
        ignored = write(client, response, length);
        close(client);
    }
}
"""


def require_image_tools() -> None:
    """Skip the test, naming what is missing, unless images can be built here."""
    for program, package in (
        ("gcc", "gcc"), ("apt-get", "apt"), ("dpkg-deb", "dpkg"), ("mke2fs", "e2fsprogs"),
    ):
        if shutil.which(program) is None:
            pytest.skip(f"building guest images needs {program} (Debian package {package})")
    result = subprocess.run(["gcc", "-static", "-x", "c", "-o", "/dev/null", "-"], input="int main(void){return 0;}",
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("building guest images needs a static libc for gcc -static (Debian package libc6-dev)")


def require_guest_kernel() -> None:
    """Fetch Debian's guest kernel into the shared cache, or skip the test when it cannot be fetched."""
    try:
        fetch_kernel(IMAGE_CACHE)
    except KernelError as error:
        pytest.skip(f"the guest kernel package cannot be fetched: {error}")


def link_shared_cache(cache: Path) -> None:
    """Link the shared cache's kernels, downloads, tools and agents into the image cache `cache`."""
    for shared in ("kernels", "downloads", "tools", "agents"):
        if (IMAGE_CACHE / shared).exists():
            os.symlink(IMAGE_CACHE / shared, cache / shared)


@contextlib.contextmanager
def short_state_dir(prefix: str) -> Iterator[Path]:
    """Yield a new /tmp directory with mode 0755, short because QEMU's socket paths under it must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def require_qemu() -> None:
    require_image_tools()
    for program, package in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils")):
        if shutil.which(program) is None:
            pytest.skip(f"microVM tests need {program} (Debian package {package})")


def compile_server(directory: Path, extra_bytes: bytes = b"") -> Path:
    """Compile the test server statically into directory/server; extra_bytes are appended to make a new digest."""
    source = directory / "server.c"
    source.write_text(SERVER_SOURCE)
    binary = directory / "server"
    subprocess.run(["gcc", "-static", "-O2", "-s", "-o", str(binary), str(source)], check=True)
    if extra_bytes:
        with open(binary, "ab") as handle:
            handle.write(extra_bytes)
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_plan(
    state_dir: Path,
    instance_id: str,
    binary: Path,
    command: list[str] | str | None = None,
    image_format: str = "initramfs",
    grace: float = 3.0,
    host_ports: list[int] | None = None,
) -> LaunchPlan:
    """Build a LaunchPlan the way the reconciler's _plan_for does, with one allocated port "http".

    host_ports becomes vm.host_ports: vsock ports on the host that guest programs may connect to.
    """
    port = free_port()
    spec = Component(
        command=command if command is not None else [str(binary)],
        shell=isinstance(command, str),
        runtime="microvm",
        ports={"http": port},
        stop_grace_period=grace,
        vm=VmSettings(vcpus=1, memory=256 * 1024 * 1024, accel="auto", host_ports=host_ports or []),
        image=ImageSpec(kind="binary", path=str(binary), format=image_format),
    )
    instance_dir = state_dir / "instances" / instance_id
    data_dir = state_dir / "data" / instance_id
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(data_dir),
        "OSVM_COMPONENT": "web",
        "OSVM_INSTANCE": instance_id,
        "OSVM_REVISION": "1",
        "OSVM_ADDRESS": "127.0.0.1",
        "OSVM_DATA_DIR": str(data_dir),
        "OSVM_PORT_HTTP": str(port),
    }
    return LaunchPlan(
        instance_id=instance_id,
        component="web",
        spec=spec,
        argv=spec.argv(),
        env=env,
        instance_dir=instance_dir,
        data_dir=data_dir,
        log_path=instance_dir / "output.log",
    )
