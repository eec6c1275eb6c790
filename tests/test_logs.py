"""End-to-end: `osvm logs` with --tail, --since and -f on a component's stdout and stderr."""

import queue
import subprocess
import threading
import time

import pytest

from e2e import OSVM, Osvm, python_command, wait_for

pytestmark = pytest.mark.root

# Prints two lines to stdout and two to stderr, then waits for a file named "tick" in its data
# directory, and from then on prints a numbered tick line every 0.2 s.
CHATTY = """
import itertools, os, sys, time
print("stdout line 1", flush=True)
print("stderr line 1", file=sys.stderr, flush=True)
print("stdout line 2", flush=True)
print("stderr line 2", file=sys.stderr, flush=True)
trigger = os.path.join(os.environ["OSVM_DATA_DIR"], "tick")
while not os.path.exists(trigger):
    time.sleep(0.1)
for number in itertools.count():
    print(f"tick {number}", flush=True)
    time.sleep(0.2)
"""

EARLY_LINES = ["stdout line 1", "stderr line 1", "stdout line 2", "stderr line 2"]


def lines_of(output: str) -> list[str]:
    return [line for line in output.splitlines() if line]


def logs(osvm: Osvm, *args: str) -> list[str]:
    return lines_of(osvm.cli("logs", "chatty", *args).stdout)


def tick_numbers(lines: list[str]) -> list[int]:
    return [int(line.split()[1]) for line in lines if line.startswith("tick ")]


def test_logs_tail_since_follow(osvm: Osvm):
    osvm.up(osvm.write_deployment({"chatty": {"command": python_command(CHATTY), "stop_grace_period": "2s"}}))
    instance = osvm.instance("chatty")

    wait_for(lambda: len(logs(osvm)) >= 4, "the first four lines in `osvm logs chatty`")
    assert logs(osvm) == EARLY_LINES

    tail = logs(osvm, "--tail", "2")
    assert tail == ["stdout line 2", "stderr line 2"]

    # The pause makes the early lines older than one second in the daemon's size samples, which
    # it takes every second.
    time.sleep(2.5)
    (osvm.data_dir(instance["id"]) / "tick").write_text("")
    wait_for(lambda: tick_numbers(logs(osvm)), "tick lines in `osvm logs chatty`")

    recent = logs(osvm, "--since", "1s")
    assert recent, "--since 1s returned nothing, although the component prints every 0.2 s"
    assert not set(recent) & set(EARLY_LINES)
    assert all(line.startswith("tick ") for line in recent), recent
    assert logs(osvm)[:4] == EARLY_LINES

    follow = subprocess.Popen(
        [str(OSVM), "--state-dir", str(osvm.state_dir), "logs", "chatty", "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    osvm.extra_processes.append(follow)
    followed: "queue.Queue[str]" = queue.Queue()
    reader = threading.Thread(target=lambda: [followed.put(line.rstrip("\n")) for line in follow.stdout], daemon=True)
    reader.start()
    try:
        last_before = max(tick_numbers(logs(osvm)))
        seen: list[str] = []

        def followed_new_tick() -> bool:
            while not followed.empty():
                seen.append(followed.get_nowait())
            return any(number > last_before + 2 for number in tick_numbers(seen))

        wait_for(followed_new_tick, "`osvm logs -f` to print new tick lines")
        assert follow.poll() is None, "osvm logs -f ended although it should keep following"
    finally:
        follow.terminate()
        follow.wait(timeout=30)
        reader.join(timeout=10)
    assert seen[:4] == EARLY_LINES
    numbers = tick_numbers(seen)
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "followed ticks are not consecutive"
