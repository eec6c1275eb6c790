"""The microvm runtime: instances run in QEMU microvm guests with the osvm guest agent as PID 1."""

from osvm.runtimes.microvm.qemu import AcceleratorError, detect_accelerator
from osvm.runtimes.microvm.runtime import MicroVmError, MicroVmRuntime

__all__ = ["AcceleratorError", "MicroVmError", "MicroVmRuntime", "detect_accelerator"]
