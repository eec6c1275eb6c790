"""Tests of the supervisor's retry when renewed certificate files do not reach an instance.

The runtime here is a small test double whose update_certificate fails a given number of times:
the case under test is the supervisor's reaction to a failed copy, which a real VM shows only when
its agent is briefly unreachable.
"""

import asyncio
from pathlib import Path

import pytest

from osvm.config.models import Component
from osvm.runtimes.base import DeliveryError, LaunchPlan, ProcessHandle
from osvm.store import InstanceRecord, Store
from osvm.store.events import EventBus
from osvm.supervise import supervisor as supervisor_module
from osvm.supervise.supervisor import InstanceSupervisor


class FlakyCopyRuntime:
    """Copies certificate files after `failures` failed attempts, and records signals."""

    name = "microvm"
    isolated = True

    def __init__(self, failures: int):
        self.failures = failures
        self.copies = 0
        self.signals: list[str] = []

    async def update_certificate(self, handle: ProcessHandle, plan: LaunchPlan) -> str:
        if self.failures > 0:
            self.failures -= 1
            raise DeliveryError("the guest agent is not connected")
        self.copies += 1
        return "copied the files"

    async def send_signal(self, handle: ProcessHandle, plan: LaunchPlan, name: str) -> None:
        self.signals.append(name)


async def test_failed_copy_retried_then_reloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_module, "CERTIFICATE_RETRY_INTERVAL", 0.01)
    store = Store(tmp_path / "state.db")
    events = EventBus(store)
    spec = Component.model_validate({"command": ["/bin/true"], "tls": {"reload_signal": "SIGHUP"}})
    plan = LaunchPlan(
        instance_id="web-1-aaaaaa", component="web", spec=spec, argv=["/bin/true"], env={},
        instance_dir=tmp_path / "instance", data_dir=tmp_path / "data", log_path=tmp_path / "output.log",
    )
    record = InstanceRecord(id="web-1-aaaaaa", component="web", revision=1, runtime="microvm", state="running")
    runtime = FlakyCopyRuntime(failures=3)
    handle = ProcessHandle(pid=1, start_time=0)
    supervisor = InstanceSupervisor(record, plan, runtime, store, events, lambda record: None, handle)  # type: ignore[arg-type]

    detail = await supervisor.reload_certificate()

    assert detail.startswith("the renewed files did not reach the instance")
    assert "retrying every" in detail
    assert runtime.signals == []
    for _ in range(500):
        if runtime.signals:
            break
        await asyncio.sleep(0.01)
    assert runtime.signals == ["SIGHUP"]
    assert runtime.copies >= 1
    reloaded = [event for event in store.events(component="web") if event.kind == "certificate.reloaded"]
    assert len(reloaded) == 1
    assert "sent SIGHUP" in reloaded[0].reason
    supervisor.detach()
    store.close()
