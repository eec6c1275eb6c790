"""The runtime interface: what isolates an instance and how it is started, watched and stopped."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from osvm.config.models import Component
from osvm.runtimes.netns import VethAddressing
from osvm.security.firewall import EgressRule, IngressRule


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a runtime needs to start one instance, resolved by the supervisor."""

    instance_id: str
    component: str
    spec: Component
    argv: list[str]
    env: dict[str, str]
    instance_dir: Path
    data_dir: Path
    log_path: Path
    # Set for network mode "namespace": the netns name and its veth addressing.
    netns_name: str | None = None
    addressing: "VethAddressing | None" = None
    # nftables rules inside the network namespace: default drop, these accepted.
    firewall: "tuple[list[IngressRule], list[EgressRule]] | None" = None

    @property
    def netns_path(self) -> str | None:
        return f"/run/netns/{self.netns_name}" if self.netns_name else None


class DeliveryError(Exception):
    """A signal or files could not be delivered to a running instance. The message gives the reason."""


@dataclass
class ExitStatus:
    """The end of an instance's main process: exit code and reason."""

    # Exit code of the process, 128 + N for a signal N, or None when it could not be read.
    code: int | None
    reason: str
    oom_killed: bool = False

    @property
    def success(self) -> bool:
        return self.code == 0


@dataclass
class ProcessHandle:
    """A started (or adopted) instance process."""

    pid: int
    start_time: int
    # The pid of the component's own process when a sandbox wraps it; the stop signal goes here.
    main_pid: int | None = None
    adopted: bool = False
    extra: dict[str, object] = field(default_factory=dict)


class Runtime(Protocol):
    """One way to isolate an instance: prepare, start, wait for exit, stop, inspect, clean up."""

    name: str
    isolated: bool

    async def prepare(self, plan: LaunchPlan) -> None: ...

    async def start(self, plan: LaunchPlan) -> ProcessHandle: ...

    async def wait(self, handle: ProcessHandle, plan: LaunchPlan) -> ExitStatus: ...

    async def stop(self, handle: ProcessHandle, plan: LaunchPlan) -> None: ...

    def adopt(self, plan: LaunchPlan, pid: int, start_time: int) -> ProcessHandle | None: ...

    def exec_prefix(self, handle: ProcessHandle, plan: LaunchPlan) -> tuple[str, ...]: ...

    async def cleanup(self, plan: LaunchPlan) -> None: ...
