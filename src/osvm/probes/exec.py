"""Exec probe: a command run inside the instance whose exit status decides health."""

import asyncio
import logging
import os
import shlex
import signal
import subprocess
import tempfile
from typing import IO

from osvm.config.models import ExecProbe
from osvm.probes.target import ProbeTarget
from osvm.probes.text import last_line

# Only the end of the output is read, because the detail shows just its last line.
OUTPUT_TAIL_BYTES = 8192
MAX_COMMAND_DISPLAY_CHARS = 100

logger = logging.getLogger("osvm.probes")


def display_command(command: list[str]) -> str:
    """Return the command shell-quoted and cut to MAX_COMMAND_DISPLAY_CHARS, for details and labels."""
    text = shlex.join(command)
    if len(text) > MAX_COMMAND_DISPLAY_CHARS:
        return text[:MAX_COMMAND_DISPLAY_CHARS] + "..."
    return text


async def check_exec(probe: ExecProbe, target: ProbeTarget) -> tuple[bool, str]:
    """Run target.exec_prefix + probe.command and return whether it exited with 0 and a detail.

    The environment is osvm's own plus target.env. The command, or the first program of
    exec_prefix, runs in a new session, so it leads its own process group. When the command
    exits, the group gets SIGKILL so that background children it left behind stop too.
    When the caller cancels this coroutine, for example on probe.timeout, the group gets
    SIGKILL before the cancellation goes on.
    The detail contains the exit status and the last line of stdout and stderr.
    """
    argv = [*target.exec_prefix, *probe.command]
    env = {**os.environ, **target.env}
    command_text = display_command(probe.command)

    # Output goes to an unlinked temporary file, not a pipe. A background child that inherits
    # a pipe keeps it open, and asyncio's Process.wait() waits for all pipes to close, so a
    # pipe would delay the result until that child exits.
    with tempfile.TemporaryFile() as output_file:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=output_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            return False, f"cannot run {shlex.quote(argv[0])}: {exc.strerror or exc}"

        try:
            returncode = await process.wait()
        finally:
            kill_process_group(process.pid)
            if process.returncode is None:
                await process.wait()

        output = _read_tail(output_file)

    return returncode == 0, _describe_exit(returncode, command_text, last_line(output))


def kill_process_group(process_group: int) -> None:
    """Send SIGKILL to every process in the group, and do nothing when the group is gone.

    NOTE: a descendant that started its own session or process group is not reached.
    """
    try:
        os.killpg(process_group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        logger.warning(
            "cannot kill process group %d of an exec probe, processes may be left running: %s", process_group, exc
        )


def _read_tail(output_file: IO[bytes]) -> str:
    size = output_file.seek(0, os.SEEK_END)
    output_file.seek(max(0, size - OUTPUT_TAIL_BYTES))
    return output_file.read().decode("utf-8", errors="replace")


def _describe_exit(returncode: int, command_text: str, output_line: str) -> str:
    if returncode < 0:
        try:
            status = f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            status = f"killed by signal {-returncode}"
        detail = f"{command_text} was {status}"
    else:
        detail = f"exit status {returncode} from {command_text}"
    if output_line:
        detail += f": {output_line}"
    return detail
