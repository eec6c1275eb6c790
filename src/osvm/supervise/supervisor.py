"""One task per instance: start it, see its exit at once, probe it, and restart it with backoff."""

import asyncio
import enum
import inspect
import logging
import time
from typing import Callable

from osvm.config.models import VmSettings
from osvm.probes import HealthMonitor, ProbeTarget
from osvm.runtimes import procinfo
from osvm.runtimes.base import DeliveryError, ExitStatus, LaunchPlan, ProcessHandle, Runtime
from osvm.store import InstanceRecord, Store
from osvm.store.events import EventBus
from osvm.supervise.restart import RestartTracker

logger = logging.getLogger("osvm.supervise")

# How long tls.reload_command may run before it is killed, in seconds.
RELOAD_COMMAND_TIMEOUT = 30.0
# How often renewed certificate files that did not reach an instance are copied again, in seconds.
CERTIFICATE_RETRY_INTERVAL = 10.0


class InstanceState(str, enum.Enum):
    """Lifecycle of one instance, as stored in the instances table."""

    #: Resources allocated, process not started yet.
    CREATED = "created"
    #: Process started, waiting for its probes to pass.
    STARTING = "starting"
    #: Process running and probes passed at least once.
    RUNNING = "running"
    #: Process exited, waiting out the restart delay.
    BACKOFF = "backoff"
    #: Stop requested: stop signal sent, grace period running.
    STOPPING = "stopping"
    #: Stopped on request and cleaned up.
    STOPPED = "stopped"
    #: Exited and not restarted, by policy.
    EXITED = "exited"
    #: Gave up after too many restarts in the policy window.
    FAILED = "failed"


# Called with the instance after every change of state or health, so the reconciler can react.
ChangeCallback = Callable[[InstanceRecord], None]


class InstanceSupervisor:
    """Own one instance from start to cleanup: the only writer of its row in the store."""

    def __init__(
        self,
        record: InstanceRecord,
        plan: LaunchPlan,
        runtime: Runtime,
        store: Store,
        events: EventBus,
        on_change: ChangeCallback,
        handle: ProcessHandle | None = None,
    ):
        self.record = record
        self.plan = plan
        self.runtime = runtime
        self.store = store
        self.events = events
        self.on_change = on_change
        self.handle = handle
        self.monitor: HealthMonitor | None = None
        self.tracker = RestartTracker(plan.spec.restart, record.restart_times)
        self.log = logger.getChild(record.id)
        self._stop_requested = asyncio.Event()
        self._restart_requested = False
        self._task: asyncio.Task[None] | None = None
        self._liveness_failed = False
        # Set when a VM's agent did not report READY within vm.boot_timeout and the VM was stopped.
        self._boot_timed_out: float | None = None
        # Copies renewed certificate files into the instance again after a failed copy.
        self._certificate_retry: asyncio.Task[None] | None = None

    # --- public interface --------------------------------------------------------------------

    def start(self) -> None:
        """Start the supervision task."""
        self._task = asyncio.create_task(self._run(), name=f"supervise-{self.record.id}")

    async def stop(self, reason: str) -> None:
        """Stop the instance (stop signal, grace period, SIGKILL), clean up, and wait for the task."""
        if self._stop_requested.is_set():
            if self._task is not None:
                await asyncio.shield(self._task)
            return
        self._stop_reason = reason
        self._stop_requested.set()
        if self._task is not None:
            await asyncio.shield(self._task)

    async def restart(self) -> None:
        """Stop the process and start it again at once, without counting against the restart policy."""
        if self.handle is None:
            return
        self._restart_requested = True
        await self.runtime.stop(self.handle, self.plan)

    async def reload_certificate(self) -> str:
        """Tell the instance that its certificate files were replaced, and return what was done.

        A runtime with update_certificate (microvm) first copies the files into the instance. When
        that fails, the instance still has its old files, so no reload signal or command follows.
        """
        settings = self.plan.spec.tls
        handle = self.handle
        done = []
        update = getattr(self.runtime, "update_certificate", None)
        if update is not None and handle is not None:
            try:
                done.append(await update(handle, self.plan))
            except DeliveryError as error:
                # The instance still has its old certificate, valid for a third of a lifetime more,
                # so the copy is retried until it succeeds or the instance ends.
                self.log.error("the renewed certificate did not reach instance %s: %s", self.record.id, error)
                if self._certificate_retry is None or self._certificate_retry.done():
                    self._certificate_retry = asyncio.create_task(
                        self._retry_certificate(), name=f"certificate-retry-{self.record.id}"
                    )
                return (
                    f"the renewed files did not reach the instance, so it was not reloaded: {error}; "
                    f"retrying every {CERTIFICATE_RETRY_INTERVAL:g} s"
                )
        if settings is not None and settings.reload_signal and handle is not None:
            send = getattr(self.runtime, "send_signal", None)
            if send is not None:
                try:
                    sent = send(handle, self.plan, settings.reload_signal)
                    if inspect.isawaitable(sent):
                        await sent
                    done.append(f"sent {settings.reload_signal}")
                except DeliveryError as error:
                    self.log.error("cannot send %s to instance %s: %s", settings.reload_signal, self.record.id, error)
                    done.append(f"sending {settings.reload_signal} failed: {error}")
        if settings is not None and settings.reload_command:
            done.append(await self._run_reload_command(settings.reload_command, handle))
        return ", ".join(done) or "no reload signal or command is configured"

    async def _run_reload_command(self, command: list[str], handle: ProcessHandle | None) -> str:
        """Run tls.reload_command and return its outcome.

        It runs on the host, or inside the instance through exec_prefix when the runtime sets
        commands_run_in_instance (microvm), where it gets the component's environment.
        """
        argv = list(command)
        if getattr(self.runtime, "commands_run_in_instance", False):
            if handle is None:
                return "reload command not run: the instance is not running"
            argv = [*self.runtime.exec_prefix(handle, self.plan), *argv]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, env=dict(self.plan.env), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
        except OSError as error:
            self.log.error("reload command of instance %s failed: %s", self.record.id, error)
            return f"reload command failed: {error}"
        try:
            code = await asyncio.wait_for(process.wait(), RELOAD_COMMAND_TIMEOUT)
        except TimeoutError:
            self.log.error("reload command of instance %s timed out after %.0f s: killed it", self.record.id, RELOAD_COMMAND_TIMEOUT)
            return f"reload command timed out after {RELOAD_COMMAND_TIMEOUT:.0f} s and was killed"
        finally:
            # Also when the renewal task is cancelled, so no reload command outlives its instance.
            if process.returncode is None:
                process.kill()
        return f"reload command exited with status {code}"

    async def _retry_certificate(self) -> None:
        """Copy the certificate files into the instance again until a copy succeeds, then reload it."""
        while True:
            await asyncio.sleep(CERTIFICATE_RETRY_INTERVAL)
            if self.handle is None or self._stop_requested.is_set() or self.done:
                return
            update = getattr(self.runtime, "update_certificate")
            try:
                await update(self.handle, self.plan)
            except DeliveryError as error:
                self.log.warning("retry: the renewed certificate did not reach instance %s: %s", self.record.id, error)
                continue
            # The copy works again; the full reload sends the signal and runs the command as well.
            detail = await self.reload_certificate()
            self.events.publish("certificate.reloaded", f"after a retry: {detail}", self.record.component, self.record.id)
            return

    def detach(self) -> None:
        """Cancel supervision but leave the process running, for a daemon that is shutting down."""
        if self._task is not None:
            self._task.cancel()
        if self._certificate_retry is not None:
            self._certificate_retry.cancel()

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    @property
    def healthy(self) -> bool:
        return self.record.state == InstanceState.RUNNING and self.record.health == "healthy"

    # --- supervision loop --------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._supervise()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - the task must record every failure before it ends.
            self.log.exception("supervision of instance %s failed", self.record.id)
            self._set_state(InstanceState.FAILED, f"supervision failed: {error}")
            self.events.publish("instance.failed", f"supervision failed: {error}", self.record.component, self.record.id)
            await self._cleanup()

    async def _supervise(self) -> None:
        if self.handle is None:
            try:
                await self.runtime.prepare(self.plan)
            except Exception as error:  # noqa: BLE001 - a preparation error ends this instance with its reason.
                self._fail(f"cannot prepare the instance: {error}")
                await self._cleanup()
                return

        while True:
            if self.handle is None:
                if not await self._start_process():
                    await self._cleanup()
                    return
            exit_status = await self._watch()
            self.handle = None

            if self._stop_requested.is_set():
                self._set_state(InstanceState.STOPPED, f"stopped: {self._stop_reason}", exit_status)
                self.events.publish(
                    "instance.stopped", f"{self._stop_reason}: {exit_status.reason}", self.record.component, self.record.id
                )
                await self._cleanup()
                return

            if self._restart_requested:
                self._restart_requested = False
                self.events.publish("instance.restarting", "restart requested by the operator", self.record.component, self.record.id)
                continue

            reason = exit_status.reason
            if self._liveness_failed:
                reason = f"restarted because a liveness probe failed ({reason})"
                self._liveness_failed = False
            if self._boot_timed_out is not None:
                reason = f"restarted because the guest agent did not report READY within {self._boot_timed_out:g} s ({reason})"
                self._boot_timed_out = None
            decision = self.tracker.decide(reason, exit_status.success and not reason.startswith("restarted"), time.time())
            self.record.restart_times = list(self.tracker.restart_times)
            if decision.failed:
                self._set_state(InstanceState.FAILED, decision.reason, exit_status)
                self.events.publish("instance.failed", decision.reason, self.record.component, self.record.id, logging.ERROR)
                await self._cleanup()
                return
            if not decision.restart:
                self._set_state(InstanceState.EXITED, decision.reason, exit_status)
                self.events.publish("instance.exited", decision.reason, self.record.component, self.record.id)
                await self._cleanup()
                return

            self._set_state(InstanceState.BACKOFF, decision.reason, exit_status)
            self.events.publish("instance.backoff", decision.reason, self.record.component, self.record.id, logging.WARNING)
            try:
                await asyncio.wait_for(self._stop_requested.wait(), decision.delay)
            except TimeoutError:
                pass
            if self._stop_requested.is_set():
                self._set_state(InstanceState.STOPPED, f"stopped during restart backoff: {self._stop_reason}")
                self.events.publish("instance.stopped", self._stop_reason, self.record.component, self.record.id)
                await self._cleanup()
                return
            self.record.restarts += 1

    async def _start_process(self) -> bool:
        try:
            self.handle = await self.runtime.start(self.plan)
        except Exception as error:  # noqa: BLE001 - a start error ends this instance with its reason.
            self._fail(f"cannot start: {error}")
            return False
        record_start = getattr(self.runtime, "record_start", None)
        if record_start is not None:
            record_start(self.handle, self.plan)
        self.record.pid = self.handle.pid
        self.record.pid_start_time = self.handle.start_time
        self.record.started_at = time.time()
        self.record.exit_code = None
        self._set_state(InstanceState.STARTING, "started")
        self.events.publish(
            "instance.started",
            f"started revision {self.record.revision} as pid {self.handle.pid} ({self._isolation_summary()})",
            self.record.component,
            self.record.id,
        )
        return True

    async def _watch(self) -> ExitStatus:
        """Run the probes while the process runs; return when it exits or a stop was requested and done."""
        assert self.handle is not None
        handle = self.handle
        monitor_task = asyncio.create_task(self._probe_when_ready(handle), name=f"probes-{self.record.id}")
        wait_task = asyncio.create_task(self.runtime.wait(handle, self.plan), name=f"wait-{self.record.id}")
        stop_task = asyncio.create_task(self._stop_requested.wait())
        try:
            done, _ = await asyncio.wait({wait_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if wait_task not in done:
                self._set_state(InstanceState.STOPPING, f"stopping: {self._stop_reason}")
                monitor_task.cancel()
                await self.runtime.stop(handle, self.plan)
            return await wait_task
        finally:
            stop_task.cancel()
            monitor_task.cancel()
            if not wait_task.done():
                wait_task.cancel()
            await asyncio.gather(monitor_task, stop_task, return_exceptions=True)
            self.monitor = None

    async def _probe_when_ready(self, handle: ProcessHandle) -> None:
        """Run the probes; for a runtime that reports readiness (a VM's agent), only once it is ready.

        A VM whose agent does not report READY within vm.boot_timeout is stopped, and the exit counts
        as a failure for the restart policy.
        """
        wait_ready = getattr(self.runtime, "wait_ready", None)
        if wait_ready is not None:
            timeout = self.plan.spec.vm.boot_timeout if self.plan.spec.vm is not None else VmSettings().boot_timeout
            if not await wait_ready(handle, timeout):
                if procinfo.is_alive(handle.pid, handle.start_time) and not self._stop_requested.is_set():
                    self._boot_timed_out = timeout
                    self.events.publish(
                        "instance.boot_timeout",
                        f"the guest agent did not report READY within {timeout:g} s: stopping the VM; see serial.log",
                        self.record.component,
                        self.record.id,
                        logging.WARNING,
                    )
                    await self.runtime.stop(handle, self.plan)
                return
        target = ProbeTarget(
            host=self.record.address,
            ports=dict(self.record.ports),
            exec_prefix=tuple(self.runtime.exec_prefix(handle, self.plan)),
            env=dict(self.plan.env),
        )
        self.monitor = HealthMonitor(
            list(self.plan.spec.probes), target, self._on_health_change, started_at=time.monotonic(), logger=self.log
        )
        await self.monitor.run()

    # --- state changes -----------------------------------------------------------------------

    def _on_health_change(self, old: str, new: str, reason: str, liveness_failed: bool) -> None:
        self.record.health = new
        if new == "healthy" and self.record.state == InstanceState.STARTING:
            self.record.state = InstanceState.RUNNING
        self.store.update_instance(self.record)
        self.events.publish(f"instance.{new}", reason, self.record.component, self.record.id)
        self.on_change(self.record)
        if liveness_failed and self.handle is not None and not self._stop_requested.is_set():
            self._liveness_failed = True
            asyncio.create_task(self.runtime.stop(self.handle, self.plan), name=f"liveness-stop-{self.record.id}")

    def _set_state(self, state: InstanceState, reason: str, exit_status: ExitStatus | None = None) -> None:
        self.record.state = state.value
        if state in (InstanceState.STARTING, InstanceState.BACKOFF, InstanceState.STOPPED, InstanceState.EXITED, InstanceState.FAILED):
            self.record.health = "unknown" if state == InstanceState.STARTING else "none"
        if exit_status is not None:
            self.record.exit_code = exit_status.code
            self.record.exit_reason = exit_status.reason
        if state in (InstanceState.BACKOFF, InstanceState.EXITED, InstanceState.FAILED):
            # The component's status shows this reason. It starts with the exit reason, where there is
            # one, and adds what happens next, such as "giving up after 3 restarts".
            self.record.exit_reason = reason
        if state in (InstanceState.STOPPED, InstanceState.EXITED, InstanceState.FAILED):
            self.record.stopped_at = time.time()
            self.record.pid = None
        self.store.update_instance(self.record)
        self.log.debug("instance %s is %s: %s", self.record.id, state.value, reason)
        self.on_change(self.record)

    def _fail(self, reason: str) -> None:
        self._set_state(InstanceState.FAILED, reason)
        self.events.publish("instance.failed", reason, self.record.component, self.record.id, logging.ERROR)

    async def _cleanup(self) -> None:
        try:
            await self.runtime.cleanup(self.plan)
        except Exception as error:  # noqa: BLE001 - cleanup errors are logged, and the instance still ends.
            self.log.error("cleanup of instance %s failed: %s", self.record.id, error)
        self.on_change(self.record)

    def _isolation_summary(self) -> str:
        describe = getattr(self.runtime, "describe_isolation", None)
        if describe is not None:
            return str(describe(self.plan))
        if not self.runtime.isolated:
            return "not isolated"
        parts = ["pid/mount/uts/ipc namespaces", f"user {self.plan.spec.user or 'osvm'}"]
        if self.plan.netns_path:
            parts.append(f"network namespace at {self.record.address}")
        return ", ".join(parts)

    _stop_reason = "stop requested"
