"""The reconciler: compare desired state in the store with the instances that run, and act.

It starts what is missing (after its dependencies are healthy), replaces instances whose revision is
no longer desired, stops what is no longer wanted, and adopts or replaces instances after a restart.
"""

import asyncio
import contextlib
import logging
import os
import re
import resource
import shutil
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Callable

from osvm import paths
from osvm.config.models import STORED_REVISION, Component, Deployment, Policy
from osvm.daemon.handover import InheritedListener
from osvm.endpoints import Backend, Endpoint, EndpointError
from osvm.endpoints.listener import parse_listen, remove_socket_file
from osvm.endpoints.tls import EndpointTls
from osvm.reconcile import allocations
from osvm.reconcile.certificates import TLS_DIR, CertificateManager
from osvm.runtimes.base import LaunchPlan, Runtime
from osvm.runtimes.netns import addressing_for
from osvm.runtimes.process import DEFAULT_USER
from osvm.runtimes.sandbox import SandboxError, find_user
from osvm.security.ca import CAError, PeerRejected
from osvm.security.firewall import EgressRule, FirewallError, IngressRule, NamespaceFirewall, parse_egress_entry
from osvm.security.policy import PolicyEngine, decide_for_endpoint
from osvm.store import ComponentRecord, InstanceRecord, Store
from osvm.store.events import EventBus
from osvm.supervise.supervisor import InstanceState, InstanceSupervisor

logger = logging.getLogger("osvm.reconcile")

# Desired states of a component.
RUNNING = "running"
STOPPED = "stopped"
REMOVED = "removed"

# A periodic pass catches anything a missed wake-up would leave; changes normally wake it at once.
RESYNC_INTERVAL = 2.0

DEFAULT_SUBNET_POOL = "10.213.0.0/16"
SUBNETS_IN_POOL = 16384

_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Variables passed from the daemon's environment to every instance; everything else is cleared.
_PASSED_ENV = ("LANG", "LC_ALL", "TZ")
# Capability number from linux/capability.h.
CAP_SYS_RESOURCE = 24

_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ApplyError(Exception):
    """A deployment cannot be applied. The message gives the reason."""


class Reconciler:
    """Drive instances towards the desired state in the store."""

    def __init__(
        self,
        store: Store,
        events: EventBus,
        runtime: Runtime,
        state_dir: Path,
        subnet_pool: str = DEFAULT_SUBNET_POOL,
        environ: dict[str, str] | None = None,
    ):
        self.store = store
        self.events = events
        self.runtime = runtime
        # Runtimes by the name a spec's `runtime` key uses; the daemon adds the ones this host offers.
        self.runtimes: dict[str, Runtime] = {runtime.name: runtime}
        self.state_dir = state_dir
        self.subnet_pool = subnet_pool
        self.environ = dict(environ or {})
        self.supervisors: dict[str, InstanceSupervisor] = {}
        self.endpoints: dict[str, Endpoint] = {}
        # Set by the daemon after a restart: the endpoints' listening sockets from the previous process.
        self.inherited_listeners: dict[str, InheritedListener] = {}
        self._specs: dict[tuple[str, int], Component] = {}
        self.policy = PolicyEngine(Policy())
        self._load_policy()
        # Set by the daemon: counts a connection an endpoint refused, by component and reason.
        self.on_refused: Callable[[str, str], None] | None = None
        # Set by the daemon: issues, renews and revokes instance certificates.
        self.certificates: CertificateManager | None = None
        # Set by the daemon: whether a rollout owns a component now, and how to start one.
        self.rollout_running: Callable[[str], bool] = lambda name: False
        self.start_rollout: Callable[[str, int, int, Component, str], Any] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._changed = asyncio.Condition()

    # --- desired state -----------------------------------------------------------------------

    def apply(self, deployment: Deployment, file: str | None) -> list[dict[str, Any]]:
        """Store a deployment as desired state and return what changed for each component."""
        changes: list[dict[str, Any]] = []
        for name in deployment.start_order():
            spec = deployment.components[name]
            spec_hash = spec.spec_hash()
            latest = self.store.latest_revision(name)
            current = self.store.component(name)
            if latest is not None and latest[1] == spec_hash:
                revision = latest[0]
                action = "unchanged" if current is not None and current.desired == RUNNING else "started"
            else:
                revision = self.store.add_revision(name, spec.model_dump(mode="json"), spec_hash)
                action = "created" if latest is None else "updated"
                self.events.publish("revision.created", f"revision {revision} stored from {file or 'the API'}", name)
            self.store.upsert_component(name, deployment.name, file, RUNNING, revision)
            if current is not None and current.status in ("failed", "exited"):
                # Applying the file again is how an operator asks for a failed component to be retried.
                self.store.set_component_status(name, "pending", "applied again after it " + current.status)
                action = "retried"
            changes.append({"component": name, "revision": revision, "action": action})

        self.store.set_setting(f"policy:{deployment.name}", deployment.policy.model_dump(mode="json", by_alias=True))
        self._load_policy()
        for record in self.store.components():
            if record.deployment == deployment.name and record.name not in deployment.components and record.desired != REMOVED:
                self.store.set_desired(record.name, REMOVED)
                self.events.publish("component.removed", f"no longer in {file or 'the deployment'}", record.name)
                changes.append({"component": record.name, "revision": record.revision, "action": "removed"})
        self.wake()
        self._refresh_firewalls()
        return changes

    def _load_policy(self) -> None:
        """Merge the stored policies of every deployment into the engine."""
        allow: list[Any] = []
        deny: list[Any] = []
        for document in self.store.settings("policy:").values():
            policy = Policy.model_validate(document)
            allow += policy.allow
            deny += policy.deny
        self.policy.set_policy(Policy(allow=allow, deny=deny))

    def firewall_rules(
        self, component: str, spec: Component, addressing: Any, ports: list[int]
    ) -> tuple[list[IngressRule], list[EgressRule]]:
        """Return the nftables rules of a namespaced instance: what policy and the spec allow, nothing else.

        Ingress: the instance's ports, from the host side of its veth only (the daemon's probes and
        endpoints). Egress: the endpoints of components that policy lets this component reach, at the
        host side of the veth, plus the spec's allow_egress entries.
        """
        ingress = [IngressRule(port=number, source=addressing.host_address) for number in sorted(set(ports))]
        egress: list[EgressRule] = []
        for destination in self.store.components():
            if destination.desired == REMOVED:
                continue
            target = self.spec(destination.name, destination.revision)
            if target.endpoint is None or target.endpoint.listen.startswith("unix:"):
                continue
            port_name = target.backend_port_name() or "*"
            decision = decide_for_endpoint(self.policy, target.endpoint, component, destination.name, port_name)
            if decision.allowed:
                listen_port = int(target.endpoint.listen.rsplit(":", 1)[1])
                egress.append(EgressRule(address=addressing.host_address, port=listen_port))
        egress += [parse_egress_entry(entry) for entry in spec.network.allow_egress]
        return ingress, egress

    def _refresh_firewalls(self) -> None:
        """Reload the firewall of every running namespaced instance after the policy changed."""
        for supervisor in list(self.supervisors.values()):
            plan = supervisor.plan
            if plan.netns_name is None or plan.addressing is None or supervisor.done:
                continue
            ports = list(supervisor.record.ports.values())
            ingress, egress = self.firewall_rules(supervisor.record.component, plan.spec, plan.addressing, ports)
            try:
                NamespaceFirewall(plan.netns_name).apply(ingress, egress)
            except FirewallError as error:
                self.events.publish("firewall.failed", str(error), supervisor.record.component, supervisor.record.id, logging.ERROR)

    def check_applicable(self, deployment: Deployment) -> None:
        """Check what validation of the file alone cannot: users exist and command references resolve.

        Raises ApplyError naming the component and the fix.
        """
        for name, spec in deployment.components.items():
            if spec.runtime not in self.runtimes:
                available = ", ".join(sorted(self.runtimes))
                raise ApplyError(
                    f"component {name}: runtime {spec.runtime!r} is not available on this daemon "
                    f"(available: {available}): see docs/microvm.md for what it needs"
                )
            if spec.runtime == "microvm" and spec.vm is not None and spec.vm.vmm == "firecracker":
                raise ApplyError(
                    f"component {name}: vm.vmm \"firecracker\" is not available in the daemon yet (its driver is "
                    f"tested only against an API simulator): use vmm = \"qemu\""
                )
            if self.runtime.isolated and spec.runtime == "process":
                try:
                    find_user(spec.user or DEFAULT_USER)
                except SandboxError as error:
                    raise ApplyError(f"component {name}: {error}") from None
            _check_open_files(name, spec.resources.open_files)
            if spec.runtime == "process":
                _check_program(name, spec, self.environ.get("PATH", _DEFAULT_PATH))
            known = (set(_PASSED_ENV) & set(self.environ)) | set(spec.env) | {
                "OSVM_COMPONENT", "OSVM_INSTANCE", "OSVM_REVISION", "OSVM_ADDRESS", "OSVM_DATA_DIR", "PATH", "HOME",
                "OSVM_GATEWAY", "OSVM_TLS_CERT", "OSVM_TLS_KEY", "OSVM_TLS_CA",
            }
            known |= {f"OSVM_PORT_{port.upper()}" for port in spec.ports}
            for argument in spec.argv():
                for reference in _REFERENCE.findall(argument):
                    if reference not in known:
                        raise ApplyError(
                            f"component {name}: command references ${{{reference}}}, which is not set: "
                            f"declare the port in ports or set the variable in env"
                        )

    def spec(self, name: str, revision: int) -> Component:
        """Return the validated spec of a revision. Revisions never change, so each is validated once."""
        key = (name, revision)
        spec = self._specs.get(key)
        if spec is None:
            spec = Component.model_validate(self.store.revision_spec(name, revision), context={STORED_REVISION: True})
            self._specs[key] = spec
        return spec

    def set_desired(self, name: str, desired: str) -> None:
        if self.store.component(name) is None:
            raise ApplyError(f"component {name!r} not found: run `osvm status` to list components")
        self.store.set_desired(name, desired)
        self.wake()

    async def restart_component(self, name: str) -> None:
        """Restart a component's instance, or start a fresh one if it had failed or stopped."""
        record = self.store.component(name)
        if record is None:
            raise ApplyError(f"component {name!r} not found: run `osvm status` to list components")
        self.store.set_desired(name, RUNNING)
        live = [supervisor for supervisor in self.supervisors.values() if supervisor.record.component == name and not supervisor.done]
        if live:
            self.events.publish("component.restart", "restart requested", name)
            await asyncio.gather(*(supervisor.restart() for supervisor in live))
        else:
            self.store.set_component_status(name, "pending", "restart requested")
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    async def wait_changed(self, timeout: float) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile until cancelled."""
        while True:
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad pass must not end reconciliation.
                logger.exception("reconcile pass failed")
            try:
                await asyncio.wait_for(self._wake.wait(), RESYNC_INTERVAL)
            except TimeoutError:
                pass
            self._wake.clear()

    async def reconcile_once(self) -> None:
        async with self._lock:
            self._forget_finished()
            components = self.store.components()
            stopping = [component for component in components if component.desired != RUNNING]
            for level in self._stop_levels(stopping):
                await asyncio.gather(*(self._converge_stopped(component.name, component.desired) for component in level))
            for component in components:
                if component.desired == RUNNING:
                    await self._converge_running(component.name, component.revision)
                    # Let supervisors and the API run between components of a large deployment.
                    await asyncio.sleep(0)
            if self.inherited_listeners:
                self._close_unclaimed_listeners()

    async def recover(self) -> None:
        """Adopt the instances a previous daemon left running, or clean them up for replacement."""
        for record in self.store.live_instances():
            try:
                await self._recover_instance(record)
            except (ApplyError, ValueError, KeyError) as error:
                logger.error("cannot recover instance %s of %s: %s", record.id, record.component, error)
                self._mark_lost(record, f"cannot be recovered: {error}")
        sweep = getattr(self.runtime, "sweep_orphans", None)
        if sweep is not None:
            live = {record.id for record in self.store.live_instances()}
            for name in await asyncio.to_thread(sweep, live):
                self.events.publish("instance.orphan_removed", f"removed orphan cgroup {name} and its processes")
        self.wake()

    async def _recover_instance(self, record: InstanceRecord) -> None:
        plan = self._plan_for(record)
        runtime = self._runtime_of(record)
        handle = None
        if record.pid is not None and record.pid_start_time is not None:
            handle = runtime.adopt(plan, record.pid, record.pid_start_time)
        if handle is not None:
            supervisor = self._supervisor_for(record, plan, handle)
            self.events.publish(
                "instance.adopted", f"adopted pid {record.pid} after a daemon restart", record.component, record.id
            )
            supervisor.start()
            self._schedule_renewal(supervisor)
            return
        reason = "its process was gone" if record.pid else "it had not started"
        self.events.publish(
            "instance.lost",
            f"not adopted after a daemon restart because {reason}: cleaning up and replacing it",
            record.component,
            record.id,
            logging.WARNING,
        )
        await runtime.cleanup(plan)
        self._mark_lost(record, f"lost after a daemon restart: {reason}")

    def _mark_lost(self, record: InstanceRecord, reason: str) -> None:
        record.state = InstanceState.STOPPED.value
        record.health = "none"
        record.exit_reason = reason
        record.stopped_at = time.time()
        record.pid = None
        self.store.update_instance(record)
        allocations.release(self.store, record.id)

    async def shutdown_instances(self, reason: str) -> None:
        """Stop every instance (used by `osvm down`)."""
        await asyncio.gather(*(supervisor.stop(reason) for supervisor in list(self.supervisors.values())))

    # --- private helpers ---------------------------------------------------------------------

    async def _converge_running(self, name: str, revision: int) -> None:
        if self.rollout_running(name):
            return
        spec = self.spec(name, revision)
        try:
            await self._ensure_endpoint(name, spec)
        except ApplyError:
            return
        mine = [supervisor for supervisor in self.supervisors.values() if supervisor.record.component == name]
        current = [supervisor for supervisor in mine if supervisor.record.revision == revision]
        outdated = [supervisor for supervisor in mine if supervisor.record.revision != revision]

        if outdated and spec.update.strategy == "blue-green" and self.start_rollout is not None and not current:
            from_revision = outdated[0].record.revision
            self.start_rollout(name, from_revision, revision, spec, "osvm up")
            return
        for supervisor in outdated:
            self.events.publish(
                "instance.replacing",
                f"revision {revision} is desired: stopping revision {supervisor.record.revision} (update strategy recreate)",
                name,
                supervisor.record.id,
            )
            await supervisor.stop(f"replaced by revision {revision}")
            self._forget_finished()

        if current:
            self._update_status(name, current[0].record)
        status = self.store.component(name)
        if status is not None and status.status in ("failed", "exited") and not current:
            return

        wanted = spec.endpoint.replicas if spec.endpoint else 1
        if len(current) >= wanted:
            return
        waiting = [dependency for dependency in spec.depends_on if not self._is_healthy(dependency)]
        if waiting:
            reason = f"waiting for {', '.join(waiting)} to become healthy"
            if status is None or status.status_reason != reason:
                self.store.set_component_status(name, "waiting", reason)
                self.events.publish("component.waiting", reason, name)
            return
        for _ in range(wanted - len(current)):
            await asyncio.sleep(0)
            try:
                self.create_instance(name, revision, spec, in_rotation=True)
            except ApplyError as error:
                self.store.set_component_status(name, "failed", str(error))
                self.events.publish("component.failed", str(error), name, level=logging.ERROR)
                return

    async def _converge_stopped(self, name: str, desired: str) -> None:
        mine = [supervisor for supervisor in self.supervisors.values() if supervisor.record.component == name]
        for supervisor in mine:
            await supervisor.stop("stop requested" if desired == STOPPED else "component removed")
        self._forget_finished()
        if desired == REMOVED:
            await self._stop_endpoint(name)
            self.store.delete_component(name)
            self._notify()
        else:
            self.store.set_component_status(name, "stopped", "stopped on request")

    def _stop_levels(self, components: list[ComponentRecord]) -> list[list[ComponentRecord]]:
        """Group components to stop so that dependents stop before what they depend on."""
        if not components:
            return []
        depends_on = {
            component.name: self.spec(component.name, component.revision).depends_on
            for component in self.store.components()
        }
        depth: dict[str, int] = {}

        def depth_of(name: str, seen: frozenset[str] = frozenset()) -> int:
            if name not in depth:
                parents = [dependency for dependency in depends_on.get(name, []) if dependency not in seen]
                depth[name] = 1 + max((depth_of(parent, seen | {name}) for parent in parents), default=0)
            return depth[name]

        levels: dict[int, list[ComponentRecord]] = {}
        for component in components:
            levels.setdefault(depth_of(component.name), []).append(component)
        return [levels[key] for key in sorted(levels, reverse=True)]

    def create_instance(self, name: str, revision: int, spec: Component, in_rotation: bool) -> InstanceSupervisor:
        """Allocate, record and start a new instance of a revision; return its supervisor.

        Raises ApplyError when ports, a subnet or the command cannot be resolved.
        """
        instance_id = f"{name}-{revision}-{secrets.token_hex(3)}"
        runtime = self.runtimes.get(spec.runtime)
        if runtime is None:
            raise ApplyError(f"runtime {spec.runtime!r} is not available on this daemon (available: {', '.join(sorted(self.runtimes))})")
        try:
            ports = allocations.allocate_ports(self.store, instance_id, spec.ports)
            address = "127.0.0.1"
            netns_name = None
            if spec.network.mode == "namespace":
                if not self.runtime.isolated:
                    raise allocations.AllocationError(
                        "network mode \"namespace\" needs the daemon to run as root: run it as root or use mode \"host\""
                    )
                index = allocations.allocate_subnet_index(self.store, instance_id, SUBNETS_IN_POOL)
                address = addressing_for(index, self.subnet_pool).instance_address
                netns_name = f"osvm-{instance_id}"
        except (allocations.AllocationError, ValueError) as error:
            allocations.release(self.store, instance_id)
            raise ApplyError(str(error)) from None

        record = InstanceRecord(
            id=instance_id,
            component=name,
            revision=revision,
            runtime=runtime.name,
            state=InstanceState.CREATED.value,
            address=address,
            ports=ports,
            isolated=runtime.isolated,
            in_rotation=in_rotation,
            netns=netns_name,
            created_at=time.time(),
        )
        if runtime is self.runtime and self.runtime.isolated and self._runtime_has_cgroups():
            record.cgroup = instance_id
        try:
            plan = self._plan_for(record, spec)
            if self.certificates is not None:
                self.certificates.issue_for_instance(name, instance_id, spec, plan.data_dir, self._instance_user(runtime, spec))
        except (ApplyError, CAError, ValueError, KeyError, OSError) as error:
            allocations.release(self.store, instance_id)
            if isinstance(error, ApplyError):
                raise
            raise ApplyError(f"cannot issue the certificate of instance {instance_id}: {error}") from None
        self.store.add_instance(record)
        if in_rotation:
            self.store.set_component_status(name, "starting", f"instance {instance_id} created")
        supervisor = self._supervisor_for(record, plan)
        supervisor.start()
        self._schedule_renewal(supervisor)
        return supervisor

    def _instance_user(self, runtime: Runtime, spec: Component) -> str | None:
        if not runtime.isolated:
            return None
        return spec.user or DEFAULT_USER

    def renew_certificates(self, name: str) -> list[str]:
        """Renew the certificates of a component's running instances now; return their ids."""
        renewed = []
        for supervisor in list(self.supervisors.values()):
            if supervisor.record.component == name and not supervisor.done:
                self._schedule_renewal(supervisor, now=True)
                renewed.append(supervisor.record.id)
        return renewed

    def _schedule_renewal(self, supervisor: InstanceSupervisor, now: bool = False) -> None:
        if self.certificates is None:
            return
        record = supervisor.record
        spec = supervisor.plan.spec
        user = self._instance_user(supervisor.runtime, spec)
        self.certificates.schedule_renewal(
            record.component, record.id, spec, supervisor.plan.data_dir, user, supervisor.reload_certificate, now
        )

    def supervisor(self, instance_id: str) -> InstanceSupervisor | None:
        return self.supervisors.get(instance_id)

    def endpoint(self, name: str) -> Endpoint | None:
        return self.endpoints.get(name)

    def set_component_revision(self, name: str, revision: int) -> None:
        record = self.store.component(name)
        if record is not None:
            self.store.upsert_component(name, record.deployment, record.file, record.desired, revision)

    def sync_endpoint(self, name: str) -> None:
        """Give the component's endpoint exactly its healthy instances that are in rotation."""
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            return
        backends = []
        for supervisor in self.supervisors.values():
            record = supervisor.record
            if record.component != name or not record.in_rotation or not supervisor.healthy:
                continue
            port_name = supervisor.plan.spec.backend_port_name()
            if port_name is None or port_name not in record.ports:
                continue
            backends.append(Backend(record.id, record.address, record.ports[port_name]))
        backends.sort(key=lambda backend: backend.instance_id)
        if [backend.instance_id for backend in endpoint.backends] != [backend.instance_id for backend in backends]:
            endpoint.set_backends(backends)
            listed = ", ".join(backend.instance_id for backend in backends) or "none (requests wait, then fail)"
            self.events.publish("endpoint.backends", f"{endpoint.listen_address} now forwards to {listed}", name)

    async def _ensure_endpoint(self, name: str, spec: Component) -> None:
        existing = self.endpoints.get(name)
        if spec.endpoint is None:
            if existing is not None:
                await self._stop_endpoint(name)
            inherited = self.inherited_listeners.pop(name, None)
            if inherited is not None:
                self._close_inherited(inherited, "the component has no endpoint now")
            return
        if existing is not None and existing.spec == spec.endpoint:
            return
        if existing is not None:
            await self._stop_endpoint(name)
        try:
            tls = self._endpoint_tls(name, spec)
        except (CAError, ValueError, OSError) as error:
            message = f"cannot set up TLS for the endpoint of {name}: {error}"
            self.store.set_component_status(name, "failed", message)
            self.events.publish("endpoint.failed", message, name, level=logging.ERROR)
            raise ApplyError(message) from None
        endpoint = Endpoint(name, spec.endpoint, logger.getChild(f"endpoint.{name}"), tls)
        inherited = self._take_inherited_listener(name, spec.endpoint.listen)
        try:
            await endpoint.start(inherited)
        except EndpointError as error:
            if inherited is not None:
                inherited.close()
            self.store.set_component_status(name, "failed", str(error))
            self.events.publish("endpoint.failed", str(error), name, level=logging.ERROR)
            raise ApplyError(str(error)) from None
        self.endpoints[name] = endpoint
        self.events.publish("endpoint.started", f"listening on {endpoint.listen_address} ({spec.endpoint.mode})", name)
        self.sync_endpoint(name)

    def _endpoint_tls(self, name: str, spec: Component) -> EndpointTls | None:
        """Build TLS termination for an endpoint with tls = "server" or "mutual"."""
        assert spec.endpoint is not None
        if spec.endpoint.tls == "none":
            return None
        if self.certificates is None:
            raise ValueError("this daemon has no certificate authority")
        mutual = spec.endpoint.tls == "mutual"
        context = self.certificates.endpoint_context(name, mutual, self.state_dir / "endpoints" / name)
        if not mutual:
            return EndpointTls(context)
        endpoint_spec = spec.endpoint
        port_name = spec.backend_port_name() or "*"
        certificates = self.certificates

        def authorize(certificate: bytes | None, peer: str) -> str | None:
            ca = certificates.ca
            if ca is None:
                return "this daemon has no certificate authority"
            try:
                identity = ca.verify_peer(certificate)
            except PeerRejected as error:
                return error.reason
            decision = decide_for_endpoint(self.policy, endpoint_spec, identity.component, name, port_name)
            if not decision.allowed:
                return f"policy denies {identity.identity} access to {name} port {port_name}: {decision.rule}"
            return None

        def on_refused(peer: str, reason: str) -> None:
            self.events.publish("endpoint.refused", f"refused {peer}: {reason}", name, level=logging.WARNING)
            if self.on_refused is not None:
                self.on_refused(name, reason)

        return EndpointTls(context, authorize, on_refused)

    async def _stop_endpoint(self, name: str) -> None:
        if self.certificates is not None:
            self.certificates.cancel_renewal(f"endpoint:{name}")
        endpoint = self.endpoints.pop(name, None)
        if endpoint is not None:
            await endpoint.stop()
            self.events.publish("endpoint.stopped", f"stopped listening on {endpoint.listen_address}", name)

    async def stop_endpoints(self) -> None:
        for name in list(self.endpoints):
            await self._stop_endpoint(name)

    def release_listeners(self) -> list[tuple[str, str, int]]:
        """Stop every endpoint accepting, and return (component, listen, descriptor) for the next daemon process."""
        released = []
        for name, endpoint in self.endpoints.items():
            released.append((name, endpoint.spec.listen, endpoint.release_listener()))
        return released

    async def finish_endpoints(self, timeout: float) -> None:
        """Finish the client connections of every endpoint after release_listeners(), up to timeout seconds."""
        endpoints, self.endpoints = self.endpoints, {}
        await asyncio.gather(*(endpoint.finish_clients(timeout) for endpoint in endpoints.values()))

    def _take_inherited_listener(self, name: str, listen: str) -> socket.socket | None:
        """Return the inherited listening socket of the endpoint of `name` if it is for `listen`, else None."""
        inherited = self.inherited_listeners.pop(name, None)
        if inherited is None:
            return None
        if inherited.listen != listen:
            self._close_inherited(inherited, f"endpoint.listen is now {listen}")
            return None
        return inherited.sock

    def _close_unclaimed_listeners(self) -> None:
        """Close the inherited listening sockets of components that no longer run."""
        for name, inherited in list(self.inherited_listeners.items()):
            component = self.store.component(name)
            if component is not None and component.desired == RUNNING:
                # The endpoint starts on it once the component converges.
                continue
            del self.inherited_listeners[name]
            self._close_inherited(inherited, f"the component is {component.desired if component else 'removed'}")

    def _close_inherited(self, inherited: InheritedListener, reason: str) -> None:
        """Close a listening socket from the previous daemon that no endpoint takes over, and its socket file."""
        inherited.sock.close()
        address = parse_listen(inherited.listen)
        if address.is_unix:
            remove_socket_file(address.path, None)
        self.events.publish("endpoint.stopped", f"stopped listening on {inherited.listen} after the daemon restart: {reason}", inherited.component)

    def _runtime_of(self, record: InstanceRecord) -> Runtime:
        runtime = self.runtimes.get(record.runtime)
        if runtime is None:
            raise ApplyError(f"instance {record.id} needs runtime {record.runtime!r}, which this daemon does not offer")
        return runtime

    def _runtime_has_cgroups(self) -> bool:
        return getattr(self.runtime, "cgroup_layout", None) is not None

    def _plan_for(self, record: InstanceRecord, spec: Component | None = None) -> LaunchPlan:
        if spec is None:
            spec = self.spec(record.component, record.revision)
        instance_dir = paths.instance_dir(self.state_dir, record.id)
        data_dir = paths.data_dir(self.state_dir, record.id)
        env = self._instance_env(record, spec, data_dir)
        addressing = None
        firewall = None
        if record.netns is not None:
            index = self._subnet_index(record.id)
            addressing = addressing_for(index, self.subnet_pool) if index is not None else None
            if addressing is not None:
                firewall = self.firewall_rules(record.component, spec, addressing, list(record.ports.values()))
                env["OSVM_GATEWAY"] = addressing.host_address
        argv = [_substitute(argument, env, record.component) for argument in spec.argv()]
        return LaunchPlan(
            instance_id=record.id,
            component=record.component,
            spec=spec,
            argv=argv,
            env=env,
            instance_dir=instance_dir,
            data_dir=data_dir,
            log_path=paths.output_log(self.state_dir, record.id),
            netns_name=record.netns,
            addressing=addressing,
            firewall=firewall,
        )

    def _instance_env(self, record: InstanceRecord, spec: Component, data_dir: Path) -> dict[str, str]:
        env = {key: self.environ[key] for key in _PASSED_ENV if key in self.environ}
        env["PATH"] = self.environ.get("PATH", _DEFAULT_PATH)
        env["HOME"] = str(data_dir)
        env.update(spec.env)
        env["OSVM_COMPONENT"] = record.component
        env["OSVM_INSTANCE"] = record.id
        env["OSVM_REVISION"] = str(record.revision)
        env["OSVM_ADDRESS"] = record.address
        env["OSVM_DATA_DIR"] = str(data_dir)
        for port_name, number in record.ports.items():
            env[f"OSVM_PORT_{port_name.upper()}"] = str(number)
        if self.certificates is not None:
            env.update(self.certificates.tls_env(data_dir))
        return env

    def _subnet_index(self, owner: str) -> int | None:
        for _, value, _ in self.store.allocations(allocations.SUBNET, owner):
            return int(value)
        return None

    def _supervisor_for(self, record: InstanceRecord, plan: LaunchPlan, handle: Any = None) -> InstanceSupervisor:
        supervisor = InstanceSupervisor(record, plan, self._runtime_of(record), self.store, self.events, self._on_instance_change, handle)
        self.supervisors[record.id] = supervisor
        return supervisor

    def _on_instance_change(self, record: InstanceRecord) -> None:
        if record.in_rotation:
            self._update_status(record.component, record)
        self.sync_endpoint(record.component)
        self._notify()
        self.wake()

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def _update_status(self, name: str, record: InstanceRecord) -> None:
        status, reason = _component_status(record)
        current = self.store.component(name)
        if current is not None and (current.status, current.status_reason) != (status, reason):
            self.store.set_component_status(name, status, reason)

    def _forget_finished(self) -> None:
        for instance_id, supervisor in list(self.supervisors.items()):
            if supervisor.done:
                allocations.release(self.store, instance_id)
                if self.certificates is not None:
                    self.certificates.revoke_instance(supervisor.record.component, instance_id)
                    _remove_key_material(supervisor.plan.data_dir / TLS_DIR, instance_id)
                with contextlib.suppress(OSError):
                    # The data directory goes only when the instance left nothing in it.
                    supervisor.plan.data_dir.rmdir()
                del self.supervisors[instance_id]

    def _is_healthy(self, name: str) -> bool:
        return any(
            supervisor.healthy for supervisor in self.supervisors.values() if supervisor.record.component == name
        )


def _remove_key_material(tls_dir: Path, instance_id: str) -> None:
    """Delete an ended instance's certificate and private key, which nothing may use any more."""
    if not tls_dir.exists():
        return
    try:
        shutil.rmtree(tls_dir)
    except OSError as error:
        logger.error("cannot remove the certificate files of ended instance %s in %s: %s", instance_id, tls_dir, error)
        return
    logger.info("removed the certificate files of ended instance %s", instance_id)


def _check_program(name: str, spec: Component, search_path: str) -> None:
    """Reject a command whose program does not exist on the host, before anything starts."""
    program = spec.argv()[0]
    if "${" in program:
        return
    if "/" in program:
        if not os.path.exists(program):
            raise ApplyError(f"component {name}: program {program!r} not found: check the path in command")
        return
    if shutil.which(program, path=spec.env.get("PATH", search_path)) is None:
        raise ApplyError(f"component {name}: program {program!r} not found on PATH: write its absolute path in command")


def _check_open_files(name: str, open_files: int | None) -> None:
    """Reject an open files limit above the daemon's hard limit when the daemon cannot raise it."""
    if open_files is None:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or open_files <= hard or _has_capability(CAP_SYS_RESOURCE):
        return
    raise ApplyError(
        f"component {name}: resources.open_files {open_files} is above the daemon's hard limit {hard}, "
        f"and the daemon cannot raise it (it lacks CAP_SYS_RESOURCE): lower open_files, or raise the "
        f"daemon's limit (LimitNOFILE= in its systemd unit)"
    )


def _has_capability(bit: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        return False
    return False


def _component_status(record: InstanceRecord) -> tuple[str, str]:
    state = record.state
    if state == InstanceState.RUNNING.value:
        if record.health == "unhealthy":
            return "unhealthy", "probes failing"
        return "running", ""
    if state in (InstanceState.CREATED.value, InstanceState.STARTING.value):
        return "starting", "waiting for probes to pass"
    if state == InstanceState.BACKOFF.value:
        return "restarting", record.exit_reason
    if state == InstanceState.STOPPING.value:
        return "stopping", ""
    if state == InstanceState.FAILED.value:
        return "failed", record.exit_reason or "failed"
    if state == InstanceState.EXITED.value:
        return "exited", record.exit_reason
    return "stopped", record.exit_reason


def _substitute(argument: str, env: dict[str, str], component: str) -> str:
    """Replace ${NAME} references in a command element with the instance's environment."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise ApplyError(
                f"component {component}: command references ${{{name}}}, which is not set: "
                f"declare the port or set it in env"
            )
        return env[name]

    return _REFERENCE.sub(replace, argument)
