"""Firecracker microVMs: an API client, VM orchestration and the runtime for vmm = "firecracker".

NOTE: tested only against tests/firecracker_simulator.py, written from Firecracker's published
API, and never against a real Firecracker.
"""

from osvm.runtimes.firecracker.client import FirecrackerClient, FirecrackerError, FirecrackerUnavailable
from osvm.runtimes.firecracker.runtime import (
    FirecrackerRuntime,
    FirecrackerRuntimeError,
    GuestImages,
    find_firecracker,
    uses_firecracker,
)
from osvm.runtimes.firecracker.vm import Drive, FirecrackerVm, NetworkInterface, VmConfig, VsockDevice

__all__ = [
    "Drive",
    "FirecrackerClient",
    "FirecrackerError",
    "FirecrackerRuntime",
    "FirecrackerRuntimeError",
    "FirecrackerUnavailable",
    "FirecrackerVm",
    "GuestImages",
    "NetworkInterface",
    "VmConfig",
    "VsockDevice",
    "find_firecracker",
    "uses_firecracker",
]
