"""Tables and durations for people; --json output bypasses this module."""

from typing import Any


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(header) for header in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = ["  ".join(header.ljust(widths[index]) for index, header in enumerate(headers)).rstrip()]
    for row in rows:
        lines.append("  ".join(cell.ljust(widths[index]) for index, cell in enumerate(row)).rstrip())
    return "\n".join(lines)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _runtime_label(instance: dict[str, Any]) -> str:
    """Return "process", "process (no isolation)" or "microvm/TCG", naming a VM's accelerator."""
    vm = instance.get("vm")
    if vm:
        return f"{instance['runtime']}/{str(vm['accelerator']).upper()}"
    return instance["runtime"] + ("" if instance["isolated"] else " (no isolation)")


def status_table(status: dict[str, Any]) -> str:
    headers = ["COMPONENT", "REV", "INSTANCE", "RUNTIME", "STATE", "HEALTH", "PID", "UPTIME", "RESTARTS", "PORTS"]
    rows: list[list[str]] = []
    for component in status["components"]:
        instances = component["instances"]
        if not instances:
            rows.append(
                [component["name"], str(component["revision"]), "-", "-", component["status"], "-", "-", "-", "-", "-"]
            )
            continue
        for instance in instances:
            ports = ",".join(f"{name}={number}" for name, number in sorted(instance["ports"].items()))
            if instance.get("netns"):
                ports = f"{instance['address']} {ports}".strip()
            rows.append(
                [
                    component["name"],
                    str(instance["revision"]),
                    instance["id"],
                    _runtime_label(instance),
                    instance["state"],
                    instance["health"],
                    str(instance["pid"] or "-"),
                    duration(instance["uptime"]),
                    str(instance["restarts"]),
                    ports or "-",
                ]
            )
    text = table(headers, rows)
    endpoints = []
    for component in status["components"]:
        endpoint = component.get("endpoint")
        if not endpoint:
            continue
        targets = ", ".join(backend["instance_id"] for backend in endpoint.get("backends", [])) or "no healthy instance"
        endpoints.append(f"{component['name']}: {endpoint['listen']} ({endpoint['mode']}) -> {targets}")
    if endpoints:
        text += "\n\nENDPOINTS\n" + "\n".join(endpoints)
    notes = [
        f"{component['name']}: {component['status']}: {component['reason']}"
        for component in status["components"]
        if component["reason"] and component["status"] not in ("running",)
    ]
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text
