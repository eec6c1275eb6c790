"""The rollout state machine: move a component from one revision to another without downtime.

    starting -> verifying -> promoted -> draining -> complete
                    |             |
                    v             v
                  failed      rolled_back

Blue is the set of instances that serve now, green the new ones. Any failure before the switch
leaves blue untouched and stops green (failed). A failure in the watch window after the switch
moves traffic back to blue and stops green (rolled_back). Every transition goes through
`Rollout._enter`, which stores the rollout and publishes an event.
"""

import asyncio
import enum
import logging
import os
import time
from typing import TYPE_CHECKING, Protocol

from osvm.config.models import Component, SolanaProbe
from osvm.probes.solana import get_slot
from osvm.store import RolloutRecord, Store
from osvm.store.events import EventBus

if TYPE_CHECKING:
    from osvm.endpoints import Endpoint
    from osvm.supervise.supervisor import InstanceSupervisor

logger = logging.getLogger("osvm.deploy")

# How often the gate and the watch window look at green's health and the endpoint's counters.
CHECK_INTERVAL = 0.1

# The pre-promotion command's output kept in the reason when it fails.
MAX_CHECK_OUTPUT = 300


class RolloutState(str, enum.Enum):
    """The state of a rollout. The first four are active and the last three final."""

    #: Green instances are being created and started beside blue.
    STARTING = "starting"
    #: Waiting for green's probes, min_healthy_time, the pre-promotion check and the slot lag.
    VERIFYING = "verifying"
    #: Traffic moved to green; watching green's probes and error rate.
    PROMOTED = "promoted"
    #: Waiting for blue's connections to finish, then stopping blue.
    DRAINING = "draining"
    #: Green serves and blue is stopped.
    COMPLETE = "complete"
    #: Traffic went back to blue after a failure or an abort in the watch window.
    ROLLED_BACK = "rolled_back"
    #: Green never became fit to serve, or the rollout was aborted before the switch. Blue was never touched.
    FAILED = "failed"


FINAL_STATES = (RolloutState.COMPLETE, RolloutState.ROLLED_BACK, RolloutState.FAILED)


class RolloutFailure(Exception):
    """A gate or watch check failed; the message is the reason stored with the rollout."""


class Fleet(Protocol):
    """The reconciler operations that a rollout uses."""

    def create_instance(self, name: str, revision: int, spec: Component, in_rotation: bool) -> "InstanceSupervisor": ...

    def supervisor(self, instance_id: str) -> "InstanceSupervisor | None": ...

    def sync_endpoint(self, name: str) -> None: ...

    def endpoint(self, name: str) -> "Endpoint | None": ...

    def set_component_revision(self, name: str, revision: int) -> None: ...


class Rollout:
    """Drive one rollout from starting to a final state."""

    def __init__(self, record: RolloutRecord, spec: Component, fleet: Fleet, store: Store, events: EventBus):
        self.record = record
        self.spec = spec
        self.fleet = fleet
        self.store = store
        self.events = events
        self.log = logger.getChild(f"{record.component}.{record.id}")
        self._aborted: str | None = None

    @property
    def state(self) -> RolloutState:
        return RolloutState(self.record.state)

    def abort(self, reason: str) -> None:
        self._aborted = reason

    async def run(self) -> None:
        """Run the rollout to a final state. Errors end it as failed or rolled_back; only cancellation propagates."""
        try:
            await self._run()
        except asyncio.CancelledError:
            await self._undo(RolloutState.ROLLED_BACK, "cancelled because the daemon is stopping")
            raise
        except Exception as error:  # noqa: BLE001 - any failure ends the rollout with its reason.
            self.log.exception("rollout %d of %s failed", self.record.id, self.record.component)
            await self._undo(self._failure_state(), f"internal error: {error}")

    # --- phases ------------------------------------------------------------------------------

    async def _run(self) -> None:
        policy = self.spec.update
        deadline = time.monotonic() + policy.healthy_deadline
        self._enter(RolloutState.STARTING, f"starting revision {self.record.to_revision} beside revision {self.record.from_revision}")
        try:
            green = self._start_green()
            self._enter(RolloutState.VERIFYING, "waiting for the new instances to pass their probes")
            await self._verify(green, deadline)
        except RolloutFailure as error:
            await self._undo(RolloutState.FAILED, str(error))
            return

        self._switch_to_green()
        self._enter(RolloutState.PROMOTED, f"traffic moved to revision {self.record.to_revision}; watching for {policy.post_promotion_window:g} s")
        try:
            await self._watch(green)
        except RolloutFailure as error:
            await self._undo(RolloutState.ROLLED_BACK, str(error))
            return

        self._enter(RolloutState.DRAINING, "draining and stopping the old instances")
        await self._drain_and_stop_blue()
        self._enter(
            RolloutState.COMPLETE,
            f"revision {self.record.to_revision} serves; {self.record.closed_connections} connection(s) closed at the drain deadline",
        )

    def _start_green(self) -> list["InstanceSupervisor"]:
        count = self.spec.endpoint.replicas if self.spec.endpoint else 1
        green = []
        for _ in range(count):
            supervisor = self.fleet.create_instance(self.record.component, self.record.to_revision, self.spec, in_rotation=False)
            green.append(supervisor)
            self.record.green.append(supervisor.record.id)
        self._save()
        return green

    async def _verify(self, green: list["InstanceSupervisor"], deadline: float) -> None:
        policy = self.spec.update
        healthy_since: float | None = None
        while True:
            self._check_aborted()
            now = time.monotonic()
            if now > deadline:
                raise RolloutFailure(
                    f"the new instances did not pass the gate within healthy_deadline {policy.healthy_deadline:g} s: "
                    f"{self._green_summary(green)}"
                )
            for supervisor in green:
                if supervisor.done or supervisor.record.state in ("failed", "exited", "stopped", "backoff"):
                    raise RolloutFailure(
                        f"new instance {supervisor.record.id} {supervisor.record.state}: {supervisor.record.exit_reason or 'see its logs'}"
                    )
            if all(supervisor.healthy for supervisor in green):
                if healthy_since is None:
                    healthy_since = now
                    self.events.publish("rollout.healthy", "new instances passed their probes", self.record.component)
                if now - healthy_since >= policy.min_healthy_time:
                    break
            else:
                healthy_since = None
            await asyncio.sleep(CHECK_INTERVAL)

        if policy.pre_promotion:
            await self._run_pre_promotion(green[0], deadline)
        if policy.max_slot_lag is not None and any(isinstance(probe, SolanaProbe) for probe in self.spec.probes):
            await self._wait_slot_catch_up(green, deadline)

    async def _watch(self, green: list["InstanceSupervisor"]) -> None:
        policy = self.spec.update
        endpoint = self.fleet.endpoint(self.record.component)
        start_counts = {supervisor.record.id: endpoint.counts(supervisor.record.id) if endpoint else (0, 0) for supervisor in green}
        window_end = time.monotonic() + policy.post_promotion_window
        while time.monotonic() < window_end:
            self._check_aborted()
            for supervisor in green:
                if not supervisor.healthy:
                    raise RolloutFailure(
                        f"new instance {supervisor.record.id} turned {supervisor.record.state}/{supervisor.record.health} "
                        f"in the watch window: {supervisor.record.exit_reason or 'probes failing'}; traffic moved back"
                    )
                if endpoint is not None:
                    requests, errors = endpoint.counts(supervisor.record.id)
                    base_requests, base_errors = start_counts[supervisor.record.id]
                    requests -= base_requests
                    errors -= base_errors
                    if requests >= policy.min_requests and errors / requests > policy.max_error_rate:
                        raise RolloutFailure(
                            f"error rate {errors}/{requests} through the endpoint to {supervisor.record.id} is above "
                            f"max_error_rate {policy.max_error_rate:g}; traffic moved back"
                        )
            await asyncio.sleep(CHECK_INTERVAL)

    async def _drain_and_stop_blue(self) -> None:
        endpoint = self.fleet.endpoint(self.record.component)
        drain_timeout = self.spec.endpoint.drain_timeout if self.spec.endpoint else 0.0
        blues = [self.fleet.supervisor(instance_id) for instance_id in self.record.blue]
        if endpoint is not None:
            closed = await asyncio.gather(*(endpoint.drain(instance_id, drain_timeout) for instance_id in self.record.blue))
            self.record.closed_connections = sum(closed)
            self._save()
        await asyncio.gather(
            *(blue.stop(f"replaced by revision {self.record.to_revision}") for blue in blues if blue is not None)
        )

    # --- switch and undo ---------------------------------------------------------------------

    def _switch_to_green(self) -> None:
        self.fleet.set_component_revision(self.record.component, self.record.to_revision)
        self._set_rotation(self.record.green, True)
        self._set_rotation(self.record.blue, False)
        self.fleet.sync_endpoint(self.record.component)

    async def _undo(self, state: RolloutState, reason: str) -> None:
        """Put blue back in rotation if needed, stop green, and end in `state`."""
        promoted = self.record.state in (RolloutState.PROMOTED.value, RolloutState.DRAINING.value)
        if promoted:
            self.fleet.set_component_revision(self.record.component, self.record.from_revision)
            self._set_rotation(self.record.blue, True)
            self._set_rotation(self.record.green, False)
            self.fleet.sync_endpoint(self.record.component)
        greens = [self.fleet.supervisor(instance_id) for instance_id in self.record.green]
        await asyncio.gather(
            *(green.stop(f"rollout {self.record.id} {state.value}") for green in greens if green is not None),
            return_exceptions=True,
        )
        self._enter(state, reason, logging.WARNING)

    def _set_rotation(self, instance_ids: list[str], in_rotation: bool) -> None:
        for instance_id in instance_ids:
            supervisor = self.fleet.supervisor(instance_id)
            if supervisor is None:
                continue
            supervisor.record.in_rotation = in_rotation
            self.store.update_instance(supervisor.record)

    # --- checks ------------------------------------------------------------------------------

    async def _run_pre_promotion(self, green: "InstanceSupervisor", deadline: float) -> None:
        env = dict(os.environ)
        env.update(green.plan.env)
        env["OSVM_GREEN_ADDRESS"] = green.record.address
        env["OSVM_GREEN_INSTANCE"] = green.record.id
        for name, number in green.record.ports.items():
            env[f"OSVM_GREEN_PORT_{name.upper()}"] = str(number)
        command = self.spec.update.pre_promotion
        self.events.publish("rollout.check", f"running pre_promotion check {command[0]}", self.record.component)
        try:
            process = await asyncio.create_subprocess_exec(
                *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True
            )
        except OSError as error:
            raise RolloutFailure(f"pre_promotion check {command[0]!r} cannot start: {error.strerror}") from None
        try:
            output, _ = await asyncio.wait_for(process.communicate(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RolloutFailure(f"pre_promotion check {command[0]!r} timed out at healthy_deadline") from None
        if process.returncode != 0:
            tail = output.decode(errors="replace").strip()[-MAX_CHECK_OUTPUT:]
            raise RolloutFailure(f"pre_promotion check {command[0]!r} exited with status {process.returncode}: {tail}")

    async def _wait_slot_catch_up(self, green: list["InstanceSupervisor"], deadline: float) -> None:
        probe = next(probe for probe in self.spec.probes if isinstance(probe, SolanaProbe))
        max_lag = self.spec.update.max_slot_lag
        assert max_lag is not None
        blues = [self.fleet.supervisor(instance_id) for instance_id in self.record.blue]
        blues = [blue for blue in blues if blue is not None and blue.healthy]
        if not blues:
            self.events.publish("rollout.slot_lag", "no healthy old instance to compare slots with: skipping the slot check", self.record.component)
            return
        last = ""
        while time.monotonic() < deadline:
            self._check_aborted()
            try:
                blue_slot = max([await _instance_slot(blue, probe) for blue in blues])
                lags = [blue_slot - await _instance_slot(supervisor, probe) for supervisor in green]
            except (OSError, ValueError, RuntimeError) as error:
                last = f"getSlot failed: {error}"
            else:
                worst = max(lags)
                last = f"slot lag {worst} (max_slot_lag {max_lag})"
                if worst <= max_lag:
                    self.events.publish("rollout.slot_lag", f"caught up: {last}", self.record.component)
                    return
            await asyncio.sleep(max(CHECK_INTERVAL, probe.interval / 5))
        raise RolloutFailure(f"the new node did not catch up with the old one within healthy_deadline: {last}")

    def _check_aborted(self) -> None:
        if self._aborted is not None:
            raise RolloutFailure(self._aborted)

    # --- bookkeeping -------------------------------------------------------------------------

    def _failure_state(self) -> RolloutState:
        if self.record.state in (RolloutState.PROMOTED.value, RolloutState.DRAINING.value):
            return RolloutState.ROLLED_BACK
        return RolloutState.FAILED

    def _enter(self, state: RolloutState, reason: str, level: int = logging.INFO) -> None:
        now = time.time()
        if self.record.phases and self.record.phases[-1].get("finished_at") is None:
            self.record.phases[-1]["finished_at"] = now
        if state in FINAL_STATES:
            self.record.finished_at = now
        else:
            self.record.phases.append({"phase": state.value, "started_at": now, "finished_at": None})
        self.record.state = state.value
        self.record.reason = reason
        self._save()
        self.events.publish(f"rollout.{state.value}", f"rollout {self.record.id}: {reason}", self.record.component, level=level)

    def _save(self) -> None:
        self.store.save_rollout(self.record)

    def _green_summary(self, green: list["InstanceSupervisor"]) -> str:
        return ", ".join(f"{supervisor.record.id} is {supervisor.record.state}/{supervisor.record.health}" for supervisor in green)


async def _instance_slot(supervisor: "InstanceSupervisor", probe: SolanaProbe) -> int:
    port = probe.port if isinstance(probe.port, int) else supervisor.record.ports[probe.port]
    return await get_slot(supervisor.record.address, port, probe.rpc_path, probe.timeout)
