"""Start, track, abort and recover rollouts; one at a time per component."""

import asyncio
import copy
import logging
import re
import time
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from osvm.config.load import ConfigError, issues_from_validation_error
from osvm.config.models import STORED_REVISION, Component
from osvm.deploy.rollout import Fleet, Rollout, RolloutState
from osvm.images.sources import source_problem
from osvm.store import RolloutRecord, Store
from osvm.store.events import EventBus

logger = logging.getLogger("osvm.deploy")


class DeployError(Exception):
    """A deploy request cannot start. The message gives the reason and the fix."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


class DeployManager:
    """Own the running rollouts of the daemon."""

    def __init__(self, store: Store, events: EventBus, fleet: Fleet):
        self.store = store
        self.events = events
        self.fleet = fleet
        self._running: dict[str, tuple[Rollout, asyncio.Task[None]]] = {}
        # Set by the daemon when it stops or restarts: a rollout started then would be rolled back at once.
        self.stopping_reason = ""

    # --- requests ----------------------------------------------------------------------------

    def deploy(
        self, component: str, spec_json: dict[str, Any] | None, settings: list[str], trigger: str
    ) -> RolloutRecord:
        """Store a new revision of `component` from a spec or --set settings, and start its rollout.

        Raises DeployError when the component is unknown, a rollout already runs, or the spec is invalid.
        """
        current = self.store.component(component)
        if current is None:
            raise DeployError(f"component {component!r} not found: apply a deployment file with `osvm up` first", 404)
        self._reject_if_running(component)

        base = spec_json if spec_json is not None else self.store.revision_spec(component, current.revision)
        document = apply_settings(base, settings) if settings else base
        try:
            spec = Component.model_validate(document)
        except ValidationError as error:
            issues = issues_from_validation_error(error, document)
            raise DeployError(str(ConfigError(f"components.{component}", issues)), 422) from None
        if spec.image is not None and spec.image.path is not None:
            # The daemon runs on the host the image is built on, so a bad source is found before a
            # revision is stored. A path from --set must be absolute; the CLI resolves one from a file.
            source = Path(spec.image.path)
            problem = (
                f"{spec.image.path} is relative: give an absolute image.path with --set"
                if not source.is_absolute()
                else source_problem(spec.image.kind, source)
            )
            if problem is not None:
                raise DeployError(f"components.{component}.image.path: {problem}", 422)

        spec_hash = spec.spec_hash()
        latest = self.store.latest_revision(component)
        if latest is not None and latest[1] == spec_hash and current.revision == latest[0]:
            raise DeployError(f"revision {current.revision} of {component} already has this spec: nothing to deploy", 409)
        to_revision = self.store.add_revision(component, spec.model_dump(mode="json"), spec_hash)
        self.events.publish("revision.created", f"revision {to_revision} stored by {trigger}", component)
        return self.start(component, current.revision, to_revision, spec, trigger)

    def rollback(self, component: str) -> RolloutRecord:
        """Deploy the revision that served before the current one, by the same procedure."""
        current = self.store.component(component)
        if current is None:
            raise DeployError(f"component {component!r} not found: run `osvm status` to list components", 404)
        self._reject_if_running(component)
        previous = None
        for rollout in self.store.rollouts(component):
            if rollout.state == RolloutState.COMPLETE.value and rollout.to_revision == current.revision:
                previous = rollout.from_revision
                break
        if previous is None:
            previous = current.revision - 1
        if previous < 1:
            raise DeployError(f"{component} has no revision before {current.revision} to roll back to", 409)
        spec = Component.model_validate(self.store.revision_spec(component, previous), context={STORED_REVISION: True})
        return self.start(component, current.revision, previous, spec, "osvm rollback")

    def start(self, component: str, from_revision: int, to_revision: int, spec: Component, trigger: str) -> RolloutRecord:
        """Start a rollout task and return its record."""
        if self.stopping_reason:
            raise DeployError(f"the daemon is {self.stopping_reason}, so no rollout starts now: run the command again in a few seconds", 503)
        self._reject_if_running(component)
        blue = [instance_id for instance_id in self._serving_instances(component)]
        record = RolloutRecord(
            id=0,
            component=component,
            from_revision=from_revision,
            to_revision=to_revision,
            strategy=spec.update.strategy,
            trigger=trigger,
            state=RolloutState.STARTING.value,
            blue=blue,
            created_at=time.time(),
        )
        self.store.save_rollout(record)
        rollout = Rollout(record, spec, self.fleet, self.store, self.events)
        task = asyncio.create_task(self._run(rollout), name=f"rollout-{component}-{record.id}")
        self._running[component] = (rollout, task)
        return record

    def abort(self, component: str) -> RolloutRecord:
        running = self._running.get(component)
        if running is None:
            raise DeployError(f"no rollout of {component} is running: nothing to abort", 409)
        rollout, _ = running
        rollout.abort("aborted by the operator (osvm deploy --abort)")
        return rollout.record

    def is_running(self, component: str) -> bool:
        return component in self._running

    def describe_running(self) -> list[str]:
        """Describe each rollout in progress, such as "rollout 3 of rpc (revision 1 -> 2, verifying)"."""
        return [
            f"rollout {rollout.record.id} of {component} (revision {rollout.record.from_revision} -> "
            f"{rollout.record.to_revision}, {rollout.record.state})"
            for component, (rollout, _) in self._running.items()
        ]

    # --- daemon restart ----------------------------------------------------------------------

    async def recover(self) -> None:
        """Bring every rollout a previous daemon left active to a consistent final state.

        Before the switch, green is stopped and blue keeps serving (rolled_back). After the switch,
        green keeps serving and blue is drained and stopped (complete).
        """
        for record in self.store.active_rollouts():
            promoted = record.state in (RolloutState.PROMOTED.value, RolloutState.DRAINING.value)
            stop_ids = record.blue if promoted else record.green
            for instance_id in stop_ids:
                supervisor = self.fleet.supervisor(instance_id)
                if supervisor is not None:
                    await supervisor.stop(f"rollout {record.id} resolved after a daemon restart")
            if promoted:
                record.state = RolloutState.COMPLETE.value
                record.reason = "the daemon restarted after the switch: the new revision keeps serving and the old instances were stopped"
            else:
                self.fleet.set_component_revision(record.component, record.from_revision)
                record.state = RolloutState.ROLLED_BACK.value
                record.reason = "the daemon restarted before the switch: the old revision keeps serving and the new instances were stopped"
            now = time.time()
            if record.phases and record.phases[-1].get("finished_at") is None:
                record.phases[-1]["finished_at"] = now
            record.finished_at = now
            self.store.save_rollout(record)
            self.events.publish(f"rollout.{record.state}", f"rollout {record.id}: {record.reason}", record.component, level=logging.WARNING)

    async def shutdown(self) -> None:
        for _, task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*(task for _, task in self._running.values()), return_exceptions=True)

    # --- private helpers ---------------------------------------------------------------------

    async def _run(self, rollout: Rollout) -> None:
        try:
            await rollout.run()
        finally:
            self._running.pop(rollout.record.component, None)

    def _reject_if_running(self, component: str) -> None:
        running = self._running.get(component)
        if running is not None:
            record = running[0].record
            raise DeployError(
                f"rollout {record.id} of {component} (revision {record.from_revision} -> {record.to_revision}) is "
                f"still {record.state}: wait for it, or stop it with `osvm deploy {component} --abort`",
                409,
            )

    def _serving_instances(self, component: str) -> list[str]:
        return [
            record.id
            for record in self.store.live_instances(component)
            if record.in_rotation
        ]


def apply_settings(spec: dict[str, Any], settings: list[str]) -> dict[str, Any]:
    """Return a copy of a spec with `key.path=value` settings applied.

    A value is read as a TOML value when it parses as one (numbers, booleans, "strings", [lists],
    {tables}) and as a plain string otherwise. Values under env, and keys that hold a string now,
    keep the text as written. List items are addressed as `command[0]`.

    Raises DeployError naming the setting when its form or path is invalid.
    """
    document = copy.deepcopy(spec)
    for setting in settings:
        if "=" not in setting:
            raise DeployError(f"invalid --set {setting!r}: write KEY=VALUE, such as env.LOG_LEVEL=debug", 422)
        key, raw = setting.split("=", 1)
        try:
            value: Any = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            value = raw
        parts: list[str | int] = []
        for part in key.strip().split("."):
            match = re.fullmatch(r"([A-Za-z0-9_-]+)((?:\[\d+\])*)", part)
            if match is None:
                raise DeployError(f"invalid --set key {key!r}: use dotted names and [index], such as command[0]", 422)
            parts.append(match.group(1))
            parts.extend(int(index) for index in re.findall(r"\[(\d+)\]", match.group(2)))
        target: Any = document
        for position, part in enumerate(parts[:-1]):
            following = parts[position + 1]
            if isinstance(part, int):
                if not isinstance(target, list) or part >= len(target):
                    raise DeployError(f"invalid --set key {key!r}: index {part} is out of range", 422)
                target = target[part]
                continue
            if not isinstance(target, dict):
                raise DeployError(f"invalid --set key {key!r}: {part!r} is not inside a table", 422)
            if part not in target or target[part] is None:
                target[part] = [] if isinstance(following, int) else {}
            target = target[part]
        last = parts[-1]
        # Environment values are strings, and so is a key that contains a string now, so the text is kept as written.
        if parts[0] == "env" or _holds_string(target, last):
            value = raw
        if isinstance(last, int):
            if not isinstance(target, list) or last > len(target):
                raise DeployError(f"invalid --set key {key!r}: index {last} is out of range", 422)
            if last == len(target):
                target.append(value)
            else:
                target[last] = value
        else:
            if not isinstance(target, dict):
                raise DeployError(f"invalid --set key {key!r}: {last!r} is not inside a table", 422)
            target[last] = value
    return document


def _holds_string(container: Any, key: str | int) -> bool:
    if isinstance(container, dict):
        return isinstance(container.get(key), str)
    if isinstance(container, list) and isinstance(key, int) and key < len(container):
        return isinstance(container[key], str)
    return False
