"""Smallest vm.memory that boots: boots the same VM with several guest memory sizes.

For each size in --sizes (MiB) and each image format in --formats, this boots --boots VMs one
after another. Each boots a binary image with a static C echo server, as a busybox initramfs or
as the same tree on an ext4 disk. A boot counts as ready when the guest agent reports READY
within --timeout seconds. Otherwise the serial log classifies it: "hang" when the log is empty,
and "panic" when the kernel printed a panic. The guest is 1 vCPU on QEMU's microvm machine, under
TCG unless --accel sets another accelerator. MIN_VM_MEMORY in src/osvm/config/models.py comes from this.

Run as root (QEMU then runs as the user osvm in a cgroup):
    .venv/bin/python bench/microvm_min_memory.py [--sizes 64,96,104,112,128] [--boots 3]
"""

import argparse
import asyncio
import dataclasses
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
from microvm_boot import IMAGE_CACHE, _remove_cgroup_parent, compile_echo_server, make_plan

from osvm.runtimes import procinfo
from osvm.runtimes.base import LaunchPlan
from osvm.runtimes.microvm import MicroVmRuntime

# Far longer than the boots that succeeded under TCG on a loaded 2-core host (under 4 s each), so
# a VM still not READY at the end has hung.
DEFAULT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def sized_plan(plan: LaunchPlan, memory_mib: int, image_format: str, accel: str) -> LaunchPlan:
    """Return plan with the guest memory, image format and accelerator replaced.

    model_copy skips validation, so sizes below MIN_VM_MEMORY can be booted.
    """
    assert plan.spec.vm is not None and plan.spec.image is not None
    vm = plan.spec.vm.model_copy(update={"memory": memory_mib * 1024 * 1024, "accel": accel})
    image = plan.spec.image.model_copy(update={"format": image_format})
    return dataclasses.replace(plan, spec=plan.spec.model_copy(update={"vm": vm, "image": image}))


def classify(ready: bool, serial: str) -> str:
    if ready:
        return "ready"
    if not serial.strip():
        return "hang"
    return "panic" if "Kernel panic" in serial else "not ready"


async def one_boot(runtime: MicroVmRuntime, plan: LaunchPlan, timeout: float) -> dict[str, Any]:
    handle = None
    try:
        await runtime.prepare(plan)
        started = time.monotonic()
        handle = await runtime.start(plan)
        runtime.record_start(handle, plan)
        ready = await runtime.wait_ready(handle, timeout)
        serial_path = plan.instance_dir / "serial.log"
        serial = serial_path.read_text(errors="replace") if serial_path.exists() else ""
        panic = next((line for line in serial.splitlines() if "Kernel panic" in line), "")
        return {"outcome": classify(ready, serial), "seconds": round(time.monotonic() - started, 2), "panic": panic}
    finally:
        if handle is not None:
            if procinfo.is_alive(handle.pid, handle.start_time):
                try:
                    await asyncio.wait_for(runtime.stop(handle, plan), STOP_TIMEOUT)
                except TimeoutError:
                    pass
            if procinfo.is_alive(handle.pid, handle.start_time):
                os.kill(handle.pid, signal.SIGKILL)
            await runtime.wait(handle, plan)
        await runtime.cleanup(plan)


async def run(sizes: list[int], formats: list[str], boots: int, timeout: float, accel: str) -> dict[str, Any]:
    table = []
    with tempfile.TemporaryDirectory(prefix="osvm-bench-", dir="/tmp") as scratch:
        state_dir = Path(scratch)
        state_dir.chmod(0o755)
        binary = compile_echo_server(state_dir)
        runtime = MicroVmRuntime(state_dir, image_cache=IMAGE_CACHE)
        try:
            index = 0
            for image_format in formats:
                for memory_mib in sizes:
                    outcomes = []
                    for _ in range(boots):
                        plan = sized_plan(make_plan(state_dir, index, binary, 256), memory_mib, image_format, accel)
                        index += 1
                        outcomes.append(await one_boot(runtime, plan, timeout))
                    ready = sum(outcome["outcome"] == "ready" for outcome in outcomes)
                    kinds = sorted({outcome["outcome"] for outcome in outcomes})
                    print(f"{image_format:<9} {memory_mib:>5} MiB: {ready}/{boots} ready ({', '.join(kinds)})", flush=True)
                    table.append({"format": image_format, "memory_mib": memory_mib, "boots": outcomes})
        finally:
            _remove_cgroup_parent(runtime)
    return {"vm": {"vcpus": 1, "accel": accel, "image": "binary", "component": "static C echo server"}, "results": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,96,104,112,128", help="guest memory sizes in MiB (default 64,96,104,112,128)")
    parser.add_argument("--formats", default="initramfs,ext4", help="image formats (default initramfs,ext4)")
    parser.add_argument("--boots", type=int, default=3, help="boots per size and format (default 3)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for READY (default 60)")
    parser.add_argument("--accel", default="tcg", choices=["tcg", "kvm", "auto"], help="accelerator (default tcg)")
    options = parser.parse_args()
    harness.require_root()
    sizes = [int(size) for size in options.sizes.split(",")]
    formats = options.formats.split(",")
    results = asyncio.run(run(sizes, formats, options.boots, options.timeout, options.accel))
    print(f"results: {harness.write_results('microvm_min_memory', results)}")


if __name__ == "__main__":
    main()
