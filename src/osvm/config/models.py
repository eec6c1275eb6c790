"""Validated models of the deployment file.

Every model rejects unknown keys, so a misspelt key is an error and never a silent default.
"""

import hashlib
import json
import os
import re
import signal
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from osvm.config.units import ByteSize, Duration

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
PORT_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,30}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# A user name or a numeric user id.
USER_PATTERN = r"^(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}|[0-9]+)$"
# osvm substitutes these references in command elements with the component's port numbers.
PORT_REFERENCE_PATTERN = re.compile(r"\$\{OSVM_PORT_([A-Za-z0-9_]+)\}")

# A smaller memory limit is usually a size written without its unit, such as 512 meant as 512MiB.
MIN_MEMORY = 1024 * 1024

# Signals that pause, resume or notify a process by default instead of ending it.
NON_TERMINATING_SIGNALS = ("SIGSTOP", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGCONT", "SIGCHLD", "SIGCLD")

# Runtimes that a deployment file may name.
SUPPORTED_RUNTIMES = ("process", "microvm")
PLANNED_RUNTIMES = ("unikernel",)

# Maximum number of vm.host_ports per VM: the guest agent's listener slots (MAX_HOST_PORTS in agent.c).
MAX_HOST_PORTS = 32

# Minimum vm.memory. Debian 12's guest kernel (linux-image-6.1.0-57-amd64) is loaded uncompressed
# and takes about 55 MB. bench/microvm_min_memory.py booted a binary image with one static server
# on QEMU's microvm machine, 1 vCPU, under TCG on a 2-core host. With format "initramfs", every
# boot hung with an empty serial log at 16 and 64 MiB and panicked ("System is deadlocked on
# memory") at 96 and 100 MiB, and 10 of 10 boots reached READY at 104 MiB. Format "ext4" needs
# more: 1 of 4 boots reached READY at 104 MiB, and 7 of 7 at 112 MiB. 128 MiB leaves a margin over
# that for the component, more vCPUs and larger images.
MIN_VM_MEMORY = 128 * 1024 * 1024

# Validation context key set when the daemon loads a revision it stored earlier. A rule added to
# the model after a revision was stored skips such revisions, so an upgrade never makes a stored
# revision unreadable. New files still get the rule.
STORED_REVISION = "stored_revision"


def _is_stored_revision(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(STORED_REVISION))


FieldPath = tuple[str | int, ...]


class InvalidFields(ValueError):
    """Problems that a validator found below the location it validates.

    Each problem is a (path, message) pair. The path is relative to the location that pydantic
    reports for the validator: the model for a model validator, such as ("probes", 0, "port") on a
    component, or the field for a field validator. load.py joins the two into the full field path.
    """

    def __init__(self, problems: list[tuple[FieldPath, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{format_path(path)}: {message}" for path, message in problems))


def format_path(path: FieldPath) -> str:
    """Format a field path the way TOML writes dotted keys, such as `components.rpc.probes[0].port`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        key = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)
        text += f".{key}" if text else key
    return text


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _require_positive(seconds: float, example: str) -> float:
    if seconds <= 0:
        raise ValueError(f"must be longer than zero, got {seconds:g}s: write a duration such as {example}")
    return seconds


# --- resources, restart and network ----------------------------------------------------------


class Resources(StrictModel):
    """Limits for one instance: cgroup memory, CPU and pids, and the open files rlimit."""

    memory: ByteSize | None = None
    # The CPU quota is cpus x 100 ms per 100 ms period, and the kernel rejects a quota below 1 ms.
    cpus: Annotated[float, Field(ge=0.01, le=1024)] | None = None
    pids: Annotated[int, Field(ge=1)] | None = None
    open_files: Annotated[int, Field(ge=16, le=1 << 20)] | None = None

    @field_validator("memory")
    @classmethod
    def _check_memory(cls, memory: int | None) -> int | None:
        if memory is not None and memory < MIN_MEMORY:
            raise ValueError(
                f"memory limit of {memory} bytes is below 1MiB: write the size with a unit, such as \"512MiB\""
            )
        return memory


class RestartPolicy(StrictModel):
    """When an exited instance is started again, and how fast."""

    policy: Literal["always", "on-failure", "never"] = "always"
    max_restarts: Annotated[int, Field(ge=0)] = 5
    window: Duration = 60.0
    backoff_initial: Duration = 1.0
    backoff_max: Duration = 30.0
    backoff_multiplier: Annotated[float, Field(ge=1.0, le=10.0)] = 2.0

    @field_validator("window")
    @classmethod
    def _check_window(cls, window: float) -> float:
        return _require_positive(window, '"60s"')

    @field_validator("backoff_initial")
    @classmethod
    def _check_backoff_initial(cls, backoff_initial: float) -> float:
        # With zero, multiplying never makes the delay grow, so a crashing component restarts in a tight loop.
        return _require_positive(backoff_initial, '"1s"')

    @model_validator(mode="after")
    def _check_backoff(self) -> "RestartPolicy":
        if self.backoff_max < self.backoff_initial:
            raise InvalidFields([(
                ("backoff_max",),
                f"backoff_max ({self.backoff_max:g}s) is shorter than backoff_initial "
                f"({self.backoff_initial:g}s): make backoff_max at least as long as backoff_initial",
            )])
        return self


_EGRESS_RE = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3})(?:/(\d{1,2}))?(?::(\d{1,5}))?$")


class Network(StrictModel):
    """Network placement: the host's network, or a network namespace with its own veth pair."""

    mode: Literal["host", "namespace"] = "host"
    # Extra egress a namespaced instance may open besides the endpoints policy allows: "CIDR" or "CIDR:port".
    allow_egress: list[str] = []

    @field_validator("allow_egress")
    @classmethod
    def _check_egress(cls, entries: list[str]) -> list[str]:
        problems: list[tuple[FieldPath, str]] = []
        for index, entry in enumerate(entries):
            match = _EGRESS_RE.match(entry)
            valid = match is not None
            if match is not None:
                octets_ok = all(int(octet) <= 255 for octet in match.group(1).split("."))
                prefix_ok = match.group(2) is None or int(match.group(2)) <= 32
                port_ok = match.group(3) is None or 1 <= int(match.group(3)) <= 65535
                valid = octets_ok and prefix_ok and port_ok
            if not valid:
                problems.append(((index,), f"invalid egress rule {entry!r}: write \"CIDR\" or \"CIDR:port\", such as \"10.0.0.0/8:443\""))
        if problems:
            raise InvalidFields(problems)
        return entries


class TlsSettings(StrictModel):
    """The instance's certificate from the internal CA, and how the instance learns of a renewal."""

    # Certificate lifetime; renewal happens at two-thirds of it, with jitter.
    lifetime: Duration = 86400.0
    # DNS names added as SANs besides the component name.
    dns_names: list[str] = []
    # Signal sent to the instance after the files are swapped, such as "SIGHUP"; none by default.
    reload_signal: str | None = None
    # Command run after the files are swapped, instead of or besides the signal: on the host for a
    # process instance, inside the guest (through the agent) for a microvm instance.
    reload_command: list[str] = []

    @field_validator("lifetime")
    @classmethod
    def _check_lifetime(cls, lifetime: float) -> float:
        if not 300 <= lifetime <= 30 * 86400:
            raise ValueError(f"lifetime {lifetime:g} s is out of range: use 5m to 30 days (720h)")
        return lifetime

    @field_validator("reload_signal")
    @classmethod
    def _check_reload_signal(cls, name: str | None) -> str | None:
        if name is None:
            return None
        normalized = name.strip().upper()
        if not normalized.startswith("SIG"):
            normalized = "SIG" + normalized
        if normalized not in signal.Signals.__members__:
            raise ValueError(f"unknown signal {name!r}: use a name such as \"SIGHUP\"")
        return normalized


# --- endpoint and update -------------------------------------------------------------------

# A listen address: "host:port", "[v6]:port", or "unix:/absolute/path".
_LISTEN_RE = re.compile(r"^(unix:/.+|\[[0-9a-fA-F:.]+\]:\d{1,5}|[A-Za-z0-9.-]+:\d{1,5})$")


class Endpoint(StrictModel):
    """The stable address of a component's service, owned by the daemon, forwarding to healthy instances."""

    listen: str
    mode: Literal["http", "tcp"] = "http"
    # The instance port that traffic goes to: a name from ports. Defaults to the only declared port.
    port: Annotated[str, Field(pattern=PORT_NAME_PATTERN)] | None = None
    replicas: Annotated[int, Field(ge=1, le=64)] = 1
    balance: Literal["round_robin", "least_connections"] = "round_robin"
    # While no instance is healthy, a new request or connection waits this long before it fails.
    queue_timeout: Duration = 10.0
    # After a switch, connections that stay on the old instance are closed after this long.
    drain_timeout: Duration = 30.0
    connect_timeout: Duration = 2.0
    # "server": TLS for clients with the endpoint's certificate; "mutual": clients must present a
    # certificate from the internal CA, and policy decides by its identity.
    tls: Literal["none", "server", "mutual"] = "none"
    # A public endpoint accepts every client that completes the handshake; policy is not applied.
    public: bool = False
    # mTLS from the endpoint to the instance. Reserved: true is rejected until it is implemented.
    upstream_tls: bool = False

    @field_validator("upstream_tls")
    @classmethod
    def _check_upstream_tls(cls, upstream_tls: bool) -> bool:
        if upstream_tls:
            raise ValueError("upstream_tls is not implemented in this version of osvm: remove it or set it to false")
        return upstream_tls

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, listen: str) -> str:
        if not _LISTEN_RE.match(listen):
            raise ValueError(
                f"invalid listen address {listen!r}: write \"127.0.0.1:8545\", \"[::1]:8545\" or "
                f"\"unix:/run/osvm/rpc.sock\""
            )
        if not listen.startswith("unix:"):
            port = int(listen.rsplit(":", 1)[1])
            if not 1 <= port <= 65535:
                raise ValueError(f"invalid listen port {port} in {listen!r}: use 1 to 65535")
        return listen


class UpdatePolicy(StrictModel):
    """The update policy: how `osvm deploy` moves a component to a new revision."""

    # blue-green starts the new instance beside the old one; recreate stops the old one first.
    strategy: Literal["blue-green", "recreate"] = "blue-green"
    # The new instance must stay healthy this long after its probes pass before it is promoted.
    min_healthy_time: Duration = 2.0
    # The whole gate (start, probes, min_healthy_time, pre_promotion) must finish within this.
    healthy_deadline: Duration = 120.0
    # A command that must exit 0 before promotion; it gets OSVM_GREEN_ADDRESS and OSVM_GREEN_PORT_*.
    pre_promotion: list[str] = []
    # After the switch, a failing probe or error rate in this window switches traffic back.
    post_promotion_window: Duration = 10.0
    # Fraction of failed requests through the endpoint to the new instance that triggers a rollback.
    max_error_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    # The error rate is judged only once at least this many requests went to the new instance.
    min_requests: Annotated[int, Field(ge=1)] = 20
    # With a solana probe: promote only when the new node's getSlot is within this many slots of the old.
    max_slot_lag: Annotated[int, Field(ge=0)] | None = None


# --- virtual machines ------------------------------------------------------------------------


class ImageSpec(StrictModel):
    """The contents of a VM's root filesystem besides the guest agent."""

    # directory: copy a host directory; binary: one static binary; debian: debootstrap these packages.
    kind: Literal["directory", "binary", "debian"]
    # For directory and binary: a host path, absolute or relative to the deployment file.
    path: str | None = None
    # For debian: packages installed with debootstrap on top of the minimal base.
    packages: list[str] = []
    # initramfs: the root filesystem is loaded into RAM; ext4: a disk image with a per-instance overlay.
    format: Literal["initramfs", "ext4"] = "initramfs"

    @model_validator(mode="after")
    def _check_source(self, info: ValidationInfo) -> "ImageSpec":
        problems: list[tuple[FieldPath, str]] = []
        if self.kind in ("directory", "binary") and not self.path:
            problems.append((("path",), f"image kind {self.kind!r} needs path: set it to the host {self.kind} to copy"))
        if self.kind == "debian" and self.path:
            problems.append((("path",), "image kind \"debian\" takes packages, not path: remove path"))
        if self.kind in ("directory", "binary") and self.packages and not _is_stored_revision(info):
            problems.append((
                ("packages",),
                f"image kind {self.kind!r} copies path and installs no packages: remove packages, or set "
                f"kind = \"debian\" to install them with debootstrap",
            ))
        if problems:
            raise InvalidFields(problems)
        return self


class VmSettings(StrictModel):
    """A microVM: its size, its VMM and its accelerator."""

    vcpus: Annotated[int, Field(ge=1, le=64)] = 1
    memory: ByteSize = 256 * 1024 * 1024
    # qemu: QEMU's microvm machine; firecracker: the Firecracker API driver (needs a firecracker binary).
    vmm: Literal["qemu", "firecracker"] = "qemu"
    # auto uses KVM only where the CPU exposes vmx/svm and kvm_intel or kvm_amd is loaded, else TCG.
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    # Extra kernel command line arguments.
    kernel_args: list[str] = []
    # How long the guest agent has to report READY after QEMU starts; then the VM is stopped and
    # restarted by the restart policy. Under TCG on a busy 2-core host, boots took up to 18 s.
    boot_timeout: Annotated[Duration, Field(gt=0)] = 120.0
    # vsock ports on the host that guest programs may connect to. The agent listens on guest TCP
    # 127.0.0.1:P for each port P and carries each connection to <instance_dir>/vsock.sock_<P>.
    host_ports: list[int] = []

    @field_validator("memory")
    @classmethod
    def _check_memory(cls, memory: int, info: ValidationInfo) -> int:
        if memory < MIN_VM_MEMORY and not _is_stored_revision(info):
            raise ValueError(
                f"{memory / (1 << 20):g} MiB is below the {MIN_VM_MEMORY >> 20} MiB a guest needs to boot: "
                f"set memory to \"{MIN_VM_MEMORY >> 20}MiB\" or more (the default is \"256MiB\")"
            )
        return memory

    @field_validator("host_ports")
    @classmethod
    def _check_host_ports(cls, ports: list[int]) -> list[int]:
        problems: list[tuple[FieldPath, str]] = []
        if len(ports) > MAX_HOST_PORTS:
            problems.append(((), f"{len(ports)} host ports listed, at most {MAX_HOST_PORTS} are supported: remove some"))
        first_index: dict[int, int] = {}
        for index, port in enumerate(ports):
            if not 1 <= port <= 65535:
                # The agent listens on guest TCP port P, so vsock ports above 65535 cannot be offered.
                problems.append(((index,), f"invalid host port {port}: use a number from 1 to 65535"))
            elif port in first_index:
                problems.append((
                    (index,),
                    f"host port {port} is listed twice, also at host_ports[{first_index[port]}]: remove one",
                ))
            else:
                first_index[port] = index
        if problems:
            raise InvalidFields(problems)
        return ports


# --- probes ----------------------------------------------------------------------------------


class ProbeBase(StrictModel):
    interval: Duration = 5.0
    # Probes run this often until the first success, so a fast starter is seen healthy quickly.
    startup_interval: Duration = 0.25
    timeout: Duration = 2.0
    success_threshold: Annotated[int, Field(ge=1, le=100)] = 1
    failure_threshold: Annotated[int, Field(ge=1, le=100)] = 3
    # Failures in this time after start do not count towards failure_threshold.
    startup_grace: Duration = 0.0
    # A liveness probe restarts the instance when it turns unhealthy, instead of only reporting it.
    liveness: bool = False

    @field_validator("interval")
    @classmethod
    def _check_interval(cls, interval: float) -> float:
        return _require_positive(interval, '"5s"')

    @field_validator("startup_interval")
    @classmethod
    def _check_startup_interval(cls, startup_interval: float) -> float:
        return _require_positive(startup_interval, '"250ms"')

    @field_validator("timeout")
    @classmethod
    def _check_timeout(cls, timeout: float) -> float:
        return _require_positive(timeout, '"2s"')


PortRef = Union[Annotated[int, Field(ge=1, le=65535)], Annotated[str, Field(pattern=PORT_NAME_PATTERN)]]


def _check_url_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"URL path {path!r} does not start with '/': write it such as \"/health\"")
    return path


UrlPath = Annotated[str, AfterValidator(_check_url_path)]


class HttpProbe(ProbeBase):
    type: Literal["http"]
    port: PortRef
    path: UrlPath = "/"
    method: Literal["GET", "HEAD", "POST"] = "GET"
    headers: dict[str, str] = {}
    # Accepted status codes. An empty list accepts 200 to 399.
    expect_status: list[Annotated[int, Field(ge=100, le=599)]] = []
    body_contains: str | None = None


class JsonRpcProbe(ProbeBase):
    type: Literal["jsonrpc"]
    port: PortRef
    path: UrlPath = "/"
    method: Annotated[str, Field(min_length=1)]
    params: list[Any] | dict[str, Any] = []
    # Without expect_result, any response without an "error" member passes.
    expect_result: Any = None


class SolanaProbe(ProbeBase):
    type: Literal["solana"]
    port: PortRef
    # GET /health must return the body "ok"; "behind" and "unknown" are unhealthy even with status 200.
    health_path: UrlPath = "/health"
    # Also call the JSON-RPC method getHealth; error -32005 (node is behind) is unhealthy.
    get_health: bool = True
    rpc_path: UrlPath = "/"


class TcpProbe(ProbeBase):
    type: Literal["tcp"]
    port: PortRef


class ExecProbe(ProbeBase):
    type: Literal["exec"]
    command: Annotated[list[str], Field(min_length=1)]

    @field_validator("command")
    @classmethod
    def _check_command(cls, command: list[str]) -> list[str]:
        if not command[0].strip():
            raise InvalidFields([((0,), "the program name is empty: write the program to run, such as \"pg_isready\"")])
        return command


Probe = Annotated[
    Union[HttpProbe, JsonRpcProbe, SolanaProbe, TcpProbe, ExecProbe],
    Field(discriminator="type"),
]


# --- component and deployment ----------------------------------------------------------------


class Component(StrictModel):
    """One named entry under [components]: what to run, where, with which limits and probes."""

    command: list[str] | str
    shell: bool = False
    env: dict[str, str] = {}
    workdir: str | None = None
    user: Annotated[str, Field(pattern=USER_PATTERN)] | None = None
    runtime: str = "process"
    resources: Resources = Resources()
    ports: dict[Annotated[str, Field(pattern=PORT_NAME_PATTERN)], Annotated[int, Field(ge=0, le=65535)]] = {}
    probes: list[Probe] = []
    restart: RestartPolicy = RestartPolicy()
    depends_on: list[str] = []
    stop_signal: str = "SIGTERM"
    stop_grace_period: Duration = 10.0
    network: Network = Network()
    endpoint: Endpoint | None = None
    update: UpdatePolicy = UpdatePolicy()
    # For runtime = "microvm": the VM and its image.
    vm: VmSettings | None = None
    image: ImageSpec | None = None
    # Issue the instance a certificate from the internal CA (files in OSVM_TLS_CERT, OSVM_TLS_KEY, OSVM_TLS_CA).
    tls: TlsSettings | None = None

    @field_validator("runtime")
    @classmethod
    def _check_runtime(cls, runtime: str) -> str:
        if runtime in SUPPORTED_RUNTIMES:
            return runtime
        if runtime in PLANNED_RUNTIMES:
            raise ValueError(f"runtime {runtime!r} is not available in this version of osvm: use \"process\"")
        raise ValueError(f"unknown runtime {runtime!r}: use \"process\"")

    @field_validator("stop_signal")
    @classmethod
    def _check_signal(cls, name: str) -> str:
        normalized = name.strip().upper()
        if not normalized.startswith("SIG"):
            normalized = "SIG" + normalized
        if normalized not in signal.Signals.__members__:
            raise ValueError(f"unknown signal {name!r}: use a name such as \"SIGTERM\" or \"SIGINT\"")
        if normalized in NON_TERMINATING_SIGNALS:
            raise ValueError(
                f"signal {name!r} does not end a process: use a signal that does, such as \"SIGTERM\" or \"SIGINT\""
            )
        return normalized

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        problems: list[tuple[FieldPath, str]] = []
        for key, value in env.items():
            if not re.match(ENV_NAME_PATTERN, key):
                problems.append((
                    (key,),
                    f"invalid environment variable name {key!r}: use letters, digits and underscores, "
                    f"not starting with a digit",
                ))
            elif key.startswith("OSVM_"):
                problems.append((
                    (key,),
                    f"environment variable {key!r} is reserved because osvm sets the names starting with OSVM_: "
                    f"choose another name",
                ))
            if "\0" in value:
                problems.append(((key,), "the value contains a NUL character, which no process can receive: remove it"))
        if problems:
            raise InvalidFields(problems)
        return env

    @field_validator("workdir")
    @classmethod
    def _check_workdir(cls, workdir: str | None) -> str | None:
        if workdir is not None and not workdir.startswith("/"):
            raise ValueError(f"workdir {workdir!r} is relative: write an absolute path such as \"/var/lib/node\"")
        return workdir

    @model_validator(mode="after")
    def _check_command_and_ports(self) -> "Component":
        problems = (
            self._command_problems() + self._port_reference_problems() + self._endpoint_problems() + self._vm_problems()
        )
        if problems:
            raise InvalidFields(problems)
        return self

    def _vm_problems(self) -> list[tuple[FieldPath, str]]:
        if self.runtime == "microvm":
            if self.image is None:
                return [(("image",), "runtime \"microvm\" needs an [image] table: set kind and path or packages")]
            return self._host_port_problems()
        problems: list[tuple[FieldPath, str]] = []
        for key in ("vm", "image"):
            if getattr(self, key) is not None:
                problems.append(((key,), f"{key} applies only to runtime \"microvm\": remove it or set runtime = \"microvm\""))
        return problems

    def _host_port_problems(self) -> list[tuple[FieldPath, str]]:
        """Report host ports that equal a fixed port, because the agent and the component would both listen on it."""
        if self.vm is None:
            return []
        fixed = {number: name for name, number in self.ports.items() if number}
        problems: list[tuple[FieldPath, str]] = []
        for index, port in enumerate(self.vm.host_ports):
            if port in fixed:
                problems.append((
                    ("vm", "host_ports", index),
                    f"host port {port} is also the fixed port ports.{fixed[port]}, so the agent's listener on "
                    f"127.0.0.1:{port} in the guest would take the component's port: choose another host port",
                ))
        return problems

    def _endpoint_problems(self) -> list[tuple[FieldPath, str]]:
        if self.endpoint is None:
            return []
        if self.endpoint.port is None:
            if len(self.ports) != 1:
                return [(
                    ("endpoint", "port"),
                    f"the component declares {len(self.ports)} ports, so the endpoint must name the one it "
                    f"forwards to: set endpoint.port to one of: {', '.join(sorted(self.ports)) or 'none declared'}",
                )]
        elif self.endpoint.port not in self.ports:
            return [(
                ("endpoint", "port"),
                f"port {self.endpoint.port!r} is not in ports (declared: {', '.join(sorted(self.ports)) or 'none'}): "
                f"add it to ports or name a declared port",
            )]
        return []

    def backend_port_name(self) -> str | None:
        """Return the name of the port that the endpoint forwards to, or None without an endpoint."""
        if self.endpoint is None:
            return None
        return self.endpoint.port or next(iter(self.ports))

    def _command_problems(self) -> list[tuple[FieldPath, str]]:
        if isinstance(self.command, str):
            if not self.shell:
                return [(
                    ("command",),
                    "command is a string but shell is false: write it as a list such as "
                    "[\"redis-server\", \"--port\", \"6379\"], or set shell = true",
                )]
            if not self.command.strip():
                return [(("command",), "command is empty: write the shell command to run")]
            elements = [self.command]
        else:
            if self.shell:
                return [(
                    ("command",),
                    "shell = true needs command to be one string, not a list: write the shell command as a "
                    "string, or remove shell = true",
                )]
            if not self.command or not self.command[0].strip():
                return [(("command",), "command is empty: write the program to run as the first list element")]
            elements = self.command
        problems: list[tuple[FieldPath, str]] = []
        for index, element in enumerate(elements):
            if "\0" in element:
                where = ("command", index) if isinstance(self.command, list) else ("command",)
                problems.append((where, "contains a NUL character, which no process can receive: remove it"))
        return problems

    def _port_reference_problems(self) -> list[tuple[FieldPath, str]]:
        problems: list[tuple[FieldPath, str]] = []
        declared = f"declared: {', '.join(sorted(self.ports))}" if self.ports else "no ports declared"
        for index, probe in enumerate(self.probes):
            port = getattr(probe, "port", None)
            if isinstance(port, str) and port not in self.ports:
                problems.append((
                    ("probes", index, "port"),
                    f"port name {port!r} is not in ports ({declared}): add it to ports or use a port number",
                ))
        elements = [self.command] if isinstance(self.command, str) else self.command
        for index, element in enumerate(elements):
            for match in PORT_REFERENCE_PATTERN.finditer(element):
                if match.group(1).lower() not in self.ports:
                    where = ("command", index) if isinstance(self.command, list) else ("command",)
                    problems.append((
                        where,
                        f"{match.group(0)} refers to port {match.group(1).lower()!r}, which is not in ports "
                        f"({declared}): add it to ports",
                    ))
        return problems

    def argv(self) -> list[str]:
        """Return the command as an argument vector, wrapping a shell string in /bin/sh -c."""
        if isinstance(self.command, str):
            return ["/bin/sh", "-c", self.command]
        return list(self.command)

    def with_paths_resolved(self, base_dir: str) -> "Component":
        """Return a copy in which a program path starting with ./ or ../ is absolute, relative to base_dir.

        This changes the first element of a list command and of each exec probe's command. Shell
        strings and all other arguments stay as written.
        """
        update: dict[str, Any] = {}
        if isinstance(self.command, list):
            update["command"] = [resolve_program(self.command[0], base_dir), *self.command[1:]]
        probes = []
        for probe in self.probes:
            if isinstance(probe, ExecProbe):
                command = [resolve_program(probe.command[0], base_dir), *probe.command[1:]]
                probe = probe.model_copy(update={"command": command})
            probes.append(probe)
        update["probes"] = probes
        if self.image is not None and self.image.path and not self.image.path.startswith("/"):
            path = os.path.normpath(os.path.join(base_dir, self.image.path))
            update["image"] = self.image.model_copy(update={"path": path})
        return self.model_copy(update=update)

    def spec_hash(self) -> str:
        """Return a stable hash of the spec, used to decide whether a change makes a new revision.

        Fields left at their defaults are not part of it, so a field added to the model, or a default
        written out in the file, does not make a new revision.
        """
        canonical = json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class PolicyRule(StrictModel):
    """One rule: a source component may (allow) or may not (deny) reach ports of a destination component."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # Component names; "*" matches every component, and a trailing "*" matches a prefix ("indexer-*").
    source: Annotated[str, Field(alias="from", pattern=r"^(\*|[a-z][a-z0-9-]{0,62}\*?)$")]
    to: Annotated[str, Field(pattern=r"^(\*|[a-z][a-z0-9-]{0,62}\*?)$")]
    # Port names of the destination; ["*"] is every port.
    ports: Annotated[list[str], Field(min_length=1)] = ["*"]


class Policy(StrictModel):
    """The network policy between components. The default is deny, and deny beats allow."""

    allow: list[PolicyRule] = []
    deny: list[PolicyRule] = []


class Deployment(StrictModel):
    """A whole deployment file."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    components: dict[Annotated[str, Field(pattern=NAME_PATTERN)], Component]
    policy: Policy = Policy()

    @model_validator(mode="after")
    def _check_components(self) -> "Deployment":
        if not self.components:
            raise InvalidFields([(
                ("components",),
                "the file declares no components: add at least one [components.NAME] table with a command",
            )])
        problems = self._dependency_problems() + self._fixed_port_problems() + self._policy_problems()
        if problems:
            raise InvalidFields(problems)
        return self

    def _policy_problems(self) -> list[tuple[FieldPath, str]]:
        problems: list[tuple[FieldPath, str]] = []
        known = ", ".join(sorted(self.components))
        for kind, rules in (("allow", self.policy.allow), ("deny", self.policy.deny)):
            for index, rule in enumerate(rules):
                where = ("policy", kind, index)
                for key, pattern in (("from", rule.source), ("to", rule.to)):
                    if not any(_name_matches(pattern, name) for name in self.components):
                        problems.append((
                            (*where, key),
                            f"{pattern!r} matches no component (declared: {known}): name a component of this file",
                        ))
                if "*" in rule.ports:
                    continue
                targets = [name for name in self.components if _name_matches(rule.to, name)]
                for port_index, port in enumerate(rule.ports):
                    if targets and not any(port in self.components[name].ports for name in targets):
                        declared = ", ".join(sorted({p for name in targets for p in self.components[name].ports})) or "none"
                        problems.append((
                            (*where, "ports", port_index),
                            f"port {port!r} is not declared by {rule.to!r} (declared: {declared}): name a declared port or \"*\"",
                        ))
        return problems

    def _dependency_problems(self) -> list[tuple[FieldPath, str]]:
        problems: list[tuple[FieldPath, str]] = []
        known = ", ".join(sorted(self.components))
        for name, component in self.components.items():
            for index, dependency in enumerate(component.depends_on):
                where = ("components", name, "depends_on", index)
                if dependency == name:
                    problems.append((where, f"component {name!r} depends on itself: remove this entry"))
                elif dependency not in self.components:
                    problems.append((
                        where,
                        f"unknown component {dependency!r} (declared: {known}): name a component of this file",
                    ))
        # The cycle search needs every name to resolve, and it would report a self-dependency a second time.
        if not problems:
            cycle = find_dependency_cycle(self.components)
            if cycle:
                problems.append((
                    ("components", cycle[0], "depends_on"),
                    f"dependency cycle {' -> '.join(cycle)}: remove one of these depends_on entries",
                ))
        return problems

    def _fixed_port_problems(self) -> list[tuple[FieldPath, str]]:
        # The daemon allocates port numbers from one pool for every instance, whatever its network
        # mode, so a fixed number may appear only once in a deployment.
        problems: list[tuple[FieldPath, str]] = []
        owners: dict[int, str] = {}
        for name, component in self.components.items():
            for port_name, number in component.ports.items():
                if number == 0:
                    continue
                where = ("components", name, "ports", port_name)
                if number in owners:
                    problems.append((
                        where,
                        f"port {number} is already used by {owners[number]}: choose another port, "
                        f"or 0 to let osvm allocate a free one",
                    ))
                else:
                    owners[number] = format_path(where)
        return problems

    def with_paths_resolved(self, base_dir: str) -> "Deployment":
        """Return a copy in which each component's program path is resolved as Component.with_paths_resolved does."""
        components = {name: component.with_paths_resolved(base_dir) for name, component in self.components.items()}
        return self.model_copy(update={"components": components})

    def start_order(self) -> list[str]:
        """Return the component names so that each comes after everything it depends on."""
        ordered: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen:
                return
            seen.add(name)
            for dependency in self.components[name].depends_on:
                visit(dependency)
            ordered.append(name)

        for name in sorted(self.components):
            visit(name)
        return ordered


def resolve_program(program: str, base_dir: str) -> str:
    """Return `program` made absolute against base_dir when it starts with ./ or ../, else unchanged.

    A bare name such as "redis-server" is left for the PATH search, and an absolute path is already complete.
    """
    if program.startswith(("./", "../")):
        return os.path.normpath(os.path.join(base_dir, program))
    return program


def _name_matches(pattern: str, name: str) -> bool:
    """Match a policy name pattern: "*" matches all, "prefix*" a prefix, anything else exactly."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return pattern == name


def find_dependency_cycle(components: dict[str, Component]) -> list[str] | None:
    """Return one dependency cycle as a list of names that starts and ends with the same name, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "visiting"
        stack.append(name)
        for dependency in components[name].depends_on:
            if dependency not in components:
                continue
            if state.get(dependency) == "visiting":
                return stack[stack.index(dependency):] + [dependency]
            if dependency not in state:
                found = visit(dependency)
                if found:
                    return found
        stack.pop()
        state[name] = "done"
        return None

    for name in sorted(components):
        if name not in state:
            found = visit(name)
            if found:
                return found
    return None
