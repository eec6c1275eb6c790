"""The daemon: store, runtime, reconciler, log rotation and the control API in one event loop."""

import asyncio
import fcntl
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from osvm import paths
from osvm.api.server import ApiServer
from osvm.daemon import handover
from osvm.deploy.manager import DeployError, DeployManager
from osvm.logs.files import LogRotator
from osvm.metrics.registry import Metrics
from osvm.reconcile.certificates import CertificateManager
from osvm.security.ca import CAError
from osvm.reconcile.reconciler import DEFAULT_SUBNET_POOL, Reconciler
from osvm.runtimes.base import LaunchPlan
from osvm.runtimes.process import ProcessRuntime
from osvm.store import Store
from osvm.store.events import EventBus

logger = logging.getLogger("osvm.daemon")


class DaemonError(Exception):
    """The daemon cannot start. The message gives the reason and the fix."""


class Daemon:
    """Own the state directory and everything that runs from it."""

    def __init__(
        self,
        state_dir: Path,
        isolation: bool | None = None,
        subnet_pool: str = DEFAULT_SUBNET_POOL,
        metrics_listen: str | None = None,
    ):
        self.state_dir = state_dir
        self.metrics_listen = metrics_listen
        self.isolation = isolation
        self.subnet_pool = subnet_pool
        self.started_at = time.time()
        self._shutdown = asyncio.Event()
        self._shutdown_reason = ""
        self._lock_file: Any = None
        self._restart_check: asyncio.Task[None] | None = None
        # Set by request_restart(): after run() returns, run_daemon() executes the daemon again
        # with these (component, listen, descriptor) listening sockets.
        self.restart_requested = False
        self.restart_drain_timeout = handover.RESTART_DRAIN_TIMEOUT
        self.released_listeners: list[tuple[str, str, int]] = []

    async def run(self) -> None:
        """Run until SIGTERM, SIGINT or a shutdown request. Instances keep running for the next daemon."""
        self._prepare_state_dir()
        self.store = Store(paths.database_path(self.state_dir))
        self.metrics = Metrics()
        self.events = EventBus(self.store, lambda event: self.metrics.events.labels(event.kind).inc())
        self.runtime = ProcessRuntime(self.state_dir, self.isolation)
        self.reconciler = Reconciler(
            self.store, self.events, self.runtime, self.state_dir, self.subnet_pool, dict(os.environ)
        )
        self._add_microvm_runtime()
        self.certificates = CertificateManager(self.state_dir / "ca", self.events)
        try:
            self.certificates.open()
        except CAError as error:
            raise DaemonError(f"cannot load the CA: {error}") from None
        self.reconciler.certificates = self.certificates
        self.deployer = DeployManager(self.store, self.events, self.reconciler)
        self.reconciler.rollout_running = self.deployer.is_running
        self.reconciler.start_rollout = self._start_rollout
        self.metrics.attach(self.reconciler)
        self.reconciler.on_refused = self._count_refusal
        self.api = ApiServer(self)
        self.rotator = LogRotator()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown, f"received {sig.name}")
        loop.add_signal_handler(signal.SIGHUP, self._restart_on_signal)
        # pyroute2 forks helper processes to enter network namespaces and ends them with SIGTERM.
        # A forked child shares the event loop's signal wake-up socket, so without this its
        # SIGTERM would reach the loop as the daemon's own and shut the daemon down.
        os.register_at_fork(after_in_child=_drop_signal_wakeup)

        inherited = handover.take_inherited()
        self.reconciler.inherited_listeners = inherited
        inherited_note = f", {_plural(len(inherited), 'endpoint listening socket')} kept from the previous process" if inherited else ""
        self.events.publish(
            "daemon.started",
            f"osvm daemon pid {os.getpid()} started on {self.state_dir} "
            f"(isolation {'on' if self.runtime.isolated else 'OFF'}, cgroups {self.runtime.cgroup_layout or 'off'}{inherited_note})",
        )
        await self.reconciler.recover()
        await self.deployer.recover()
        await self.api.start(paths.socket_path(self.state_dir))
        if self.metrics_listen:
            host, _, port = self.metrics_listen.rpartition(":")
            try:
                await self.api.start_metrics(host.strip("[]") or "127.0.0.1", int(port))
            except (OSError, ValueError) as error:
                await self.api.stop()
                raise DaemonError(f"invalid --metrics-listen {self.metrics_listen!r}: {error}") from None
        tasks = [
            asyncio.create_task(self.reconciler.run(), name="reconcile"),
            asyncio.create_task(self.rotator.run(self._live_log_paths), name="log-rotation"),
        ]
        try:
            await self._shutdown.wait()
        finally:
            if self.restart_requested:
                count = len(self.reconciler.endpoints)
                self.events.publish(
                    "daemon.restarting",
                    f"{self._shutdown_reason}: executing the daemon again with the listening sockets of "
                    f"{_plural(count, 'endpoint')}; instances keep running",
                )
            else:
                self.events.publish("daemon.stopping", f"{self._shutdown_reason}: instances keep running and are adopted at the next start")
            await self.api.stop()
            await self.deployer.shutdown()
            await self.certificates.shutdown()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.restart_requested:
                # The endpoints served until now. New connections wait in the accept queues from here on.
                self.released_listeners = self.reconciler.release_listeners()
                await self.reconciler.finish_endpoints(self.restart_drain_timeout)
            else:
                await self.reconciler.stop_endpoints()
            await self._detach_supervisors()
            if not self.store.live_instances():
                # Nothing to adopt later, so the empty cgroup parent of this state directory can go.
                self.runtime.remove_cgroup_parent()
            self.store.close()
            if not self.restart_requested:
                # The file stays, because a new daemon may already wait on its lock; the pid goes.
                self._lock_file.seek(0)
                self._lock_file.truncate()
                self._lock_file.flush()
            logger.info("daemon stopped to execute itself again" if self.restart_requested else "daemon stopped")

    def request_shutdown(self, reason: str) -> None:
        self._shutdown_reason = reason
        self._shutdown.set()
        if hasattr(self, "deployer"):
            self.deployer.stopping_reason = "restarting" if self.restart_requested else "stopping"

    def request_restart(self, reason: str, drain_timeout: float = handover.RESTART_DRAIN_TIMEOUT) -> None:
        """Stop as for a shutdown, then execute the daemon again with the endpoints' listening sockets."""
        if self._shutdown.is_set():
            # A stop or restart is already under way, and it decides what happens.
            logger.info("ignored a restart (%s): the daemon is already stopping", reason)
            return
        self.restart_requested = True
        self.restart_drain_timeout = drain_timeout
        self.request_shutdown(reason)

    def _restart_on_signal(self) -> None:
        if self._restart_check is not None and not self._restart_check.done():
            logger.info("received SIGHUP while the installed osvm is being checked for a restart: ignored")
            return
        self._restart_check = asyncio.create_task(self._restart_after_check(), name="restart-check")

    async def _restart_after_check(self) -> None:
        """Restart on SIGHUP once the installed osvm starts; otherwise keep running and publish the reason."""
        problem = await handover.check_installed_code()
        if problem:
            self.events.publish(
                "daemon.restart_failed",
                f"received SIGHUP, but the daemon keeps running, because the installed osvm does not start: {problem}",
                level=logging.ERROR,
            )
            return
        self.request_restart_rolling_back("received SIGHUP")

    def request_restart_rolling_back(self, reason: str, drain_timeout: float = handover.RESTART_DRAIN_TIMEOUT) -> None:
        """Publish the rollouts that the restart rolls back, if any, then restart."""
        rollouts = self.deployer.describe_running()
        if rollouts:
            self.events.publish("daemon.restart_rolls_back", f"{reason}: rolling back {'; '.join(rollouts)}", level=logging.WARNING)
        self.request_restart(reason, drain_timeout)

    def _add_microvm_runtime(self) -> None:
        """Offer runtime "microvm" when QEMU is installed, and log the reason when it is not."""
        if shutil.which("qemu-system-x86_64") is None:
            logger.info("runtime microvm is off: qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
            return
        from osvm.runtimes.microvm import MicroVmRuntime

        self.reconciler.runtimes["microvm"] = MicroVmRuntime(self.state_dir)
        logger.info("runtime microvm is on (QEMU)")

    def _count_refusal(self, component: str, reason: str) -> None:
        source = reason.split(" access to ", 1)[0].rsplit("/", 1)[-1] if reason.startswith("policy denies") else "unknown"
        kind = "policy" if reason.startswith("policy denies") else "certificate"
        self.metrics.policy_denials.labels(component, source, kind).inc()

    def _start_rollout(self, name: str, from_revision: int, to_revision: int, spec: Any, trigger: str) -> None:
        try:
            self.deployer.start(name, from_revision, to_revision, spec, trigger)
        except DeployError as error:
            logger.warning("cannot start a rollout of %s: %s", name, error)

    def status(self) -> dict[str, Any]:
        """Return components with their instances, for `osvm status`."""
        now = time.time()
        components = []
        for record in self.store.components():
            instances = []
            for supervisor in self.reconciler.supervisors.values():
                if supervisor.record.component != record.name:
                    continue
                instance = supervisor.record
                instances.append(
                    {
                        "id": instance.id,
                        "revision": instance.revision,
                        "runtime": instance.runtime,
                        "state": instance.state,
                        "health": instance.health,
                        "pid": instance.pid,
                        "uptime": round(now - instance.started_at, 1) if instance.started_at and instance.pid else None,
                        "restarts": instance.restarts,
                        "ports": instance.ports,
                        "address": instance.address,
                        "isolated": instance.isolated,
                        "in_rotation": instance.in_rotation,
                        "netns": instance.netns,
                        "exit_reason": instance.exit_reason,
                        "probes": supervisor.monitor.describe() if supervisor.monitor else [],
                        "vm": _vm_status(supervisor.runtime, supervisor.plan),
                    }
                )
            endpoint = self.reconciler.endpoint(record.name)
            rollout = self.store.rollouts(record.name, limit=1)
            components.append(
                {
                    "endpoint": endpoint.describe() if endpoint is not None else None,
                    "rollout": rollout[0].to_json() if rollout else None,
                    "name": record.name,
                    "deployment": record.deployment,
                    "desired": record.desired,
                    "revision": record.revision,
                    "status": record.status,
                    "reason": record.status_reason,
                    "instances": instances,
                }
            )
        return {
            "daemon": {
                "pid": os.getpid(),
                "isolated": self.runtime.isolated,
                "cgroup_layout": self.runtime.cgroup_layout,
                "state_dir": str(self.state_dir),
            },
            "components": components,
        }

    # --- private helpers ---------------------------------------------------------------------

    def _prepare_state_dir(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise DaemonError(f"cannot create the state directory {self.state_dir}: permission denied: choose another --state-dir") from None
        os.chmod(self.state_dir, 0o700)
        inherited_lock = handover.take_inherited_lock(str(paths.pid_path(self.state_dir)))
        if inherited_lock is not None:
            self._lock_file = os.fdopen(inherited_lock, "a+")
        else:
            self._lock_file = open(paths.pid_path(self.state_dir), "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "unknown"
            raise DaemonError(
                f"another osvm daemon (pid {holder}) already uses {self.state_dir}: stop it or choose another --state-dir"
            ) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()

    def lock_descriptor(self) -> int | None:
        """Return the descriptor of the locked pid file, which the executed daemon inherits."""
        return self._lock_file.fileno() if self._lock_file is not None else None

    def _live_log_paths(self) -> list[Path]:
        return [supervisor.plan.log_path for supervisor in self.reconciler.supervisors.values() if not supervisor.done]

    async def _detach_supervisors(self) -> None:
        """Cancel supervision tasks without stopping instances, so the next daemon adopts them."""
        for supervisor in self.reconciler.supervisors.values():
            supervisor.detach()
        await asyncio.sleep(0)


def _drop_signal_wakeup() -> None:
    """Stop a forked child from writing the signals it receives to the parent's wake-up socket."""
    signal.set_wakeup_fd(-1)


def run_daemon(state_dir: Path, isolation: bool | None, subnet_pool: str, metrics_listen: str | None = None) -> int:
    """Run the daemon in the foreground; return the exit status."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    daemon = Daemon(state_dir, isolation, subnet_pool, metrics_listen)
    try:
        if uvloop is not None:
            uvloop.run(daemon.run())
        else:
            asyncio.run(daemon.run())
    except DaemonError as error:
        logger.error("%s", error)
        return 1
    if daemon.restart_requested:
        try:
            handover.reexec(daemon.released_listeners, daemon.lock_descriptor())
        except OSError as error:
            logger.error(
                "cannot execute the daemon again: %s: the endpoints stopped; start the daemon by hand, and it adopts the instances",
                error,
            )
            return 1
    return 0


def _vm_status(runtime: object, plan: LaunchPlan) -> dict[str, Any] | None:
    """Return the accelerator, network and size of a VM instance, or None for other runtimes."""
    describe = getattr(runtime, "vm_status", None)
    return describe(plan) if describe is not None else None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
