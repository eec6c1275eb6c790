"""Prometheus metrics of one daemon: a private registry, collected from live state at scrape time.

Counters that events drive (events by kind, policy denials) are incremented where the event happens.
Everything else (instance health and restarts, endpoint counters) is read from the daemon when
Prometheus scrapes, so those numbers follow the state they describe.
"""

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from osvm.reconcile.reconciler import Reconciler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The daemon's metrics registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "osvm_events", "Events recorded, by kind", ["kind"], registry=self.registry
        )
        self.policy_denials = Counter(
            "osvm_policy_denials",
            "Connections an endpoint refused by policy or certificate checks",
            ["component", "source", "reason"],
            registry=self.registry,
        )

    def attach(self, reconciler: "Reconciler") -> None:
        """Collect instance and endpoint figures from the reconciler at every scrape."""
        self.registry.register(_StateCollector(reconciler))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, reconciler: "Reconciler"):
        self.reconciler = reconciler

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("osvm_instance_up", "1 when the instance process runs", labels=["component", "instance", "revision"])
        healthy = GaugeMetricFamily("osvm_instance_healthy", "1 when all probes of the instance pass", labels=["component", "instance"])
        restarts = CounterMetricFamily("osvm_instance_restarts", "Restarts of the instance process", labels=["component", "instance"])
        for supervisor in list(self.reconciler.supervisors.values()):
            record = supervisor.record
            up.add_metric([record.component, record.id, str(record.revision)], 1.0 if record.pid else 0.0)
            healthy.add_metric([record.component, record.id], 1.0 if supervisor.healthy else 0.0)
            restarts.add_metric([record.component, record.id], float(record.restarts))
        yield up
        yield healthy
        yield restarts

        requests = CounterMetricFamily("osvm_endpoint_requests", "Requests or connections forwarded to an instance", labels=["component", "instance"])
        errors = CounterMetricFamily("osvm_endpoint_errors", "Failed requests or connections to an instance", labels=["component", "instance"])
        backends = GaugeMetricFamily("osvm_endpoint_backends", "Instances the endpoint forwards to", labels=["component"])
        for name, endpoint in list(self.reconciler.endpoints.items()):
            backends.add_metric([name], float(len(endpoint.backends)))
            for supervisor in list(self.reconciler.supervisors.values()):
                if supervisor.record.component != name:
                    continue
                sent, failed = endpoint.counts(supervisor.record.id)
                requests.add_metric([name, supervisor.record.id], float(sent))
                errors.add_metric([name, supervisor.record.id], float(failed))
        yield requests
        yield errors
        yield backends
