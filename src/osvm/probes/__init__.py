"""Health probes of running instances: HTTP, JSON-RPC, Solana, TCP and exec checks.

run_probe runs one probe once. HealthMonitor runs all probes of an instance on their
intervals and reports changes of the instance's health state.
"""

from osvm.probes.describe import describe_probe
from osvm.probes.jsonrpc import InvalidJsonRpcResponse, JsonRpcCallError, JsonRpcError, call_jsonrpc
from osvm.probes.monitor import HealthMonitor
from osvm.probes.result import ProbeResult
from osvm.probes.runner import run_probe
from osvm.probes.solana import get_slot
from osvm.probes.target import ProbeConfigError, ProbeTarget
from osvm.probes.tracker import HEALTHY, STARTING, UNHEALTHY

__all__ = [
    "HEALTHY",
    "STARTING",
    "UNHEALTHY",
    "HealthMonitor",
    "InvalidJsonRpcResponse",
    "JsonRpcCallError",
    "JsonRpcError",
    "ProbeConfigError",
    "ProbeResult",
    "ProbeTarget",
    "call_jsonrpc",
    "describe_probe",
    "get_slot",
    "run_probe",
]
