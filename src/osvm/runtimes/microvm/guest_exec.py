"""Run a command inside a microVM through its guest agent, for exec probes and for people.

    python -m osvm.runtimes.microvm.guest_exec --socket INSTANCE_DIR/exec.sock -- pg_isready -q

The command's output (its last 4 KiB, stdout and stderr together) is written to stdout and its
exit status becomes this program's exit status. When the agent cannot be reached the exit status
is 125 and stderr gives the reason. The daemon's exec multiplexer serves the socket, so concurrent
calls run side by side, at most 16 per VM (more get an error from the agent). A command still
running at --timeout is killed in the guest, and its output so far is printed.
"""

import argparse
import os
import secrets
import signal
import socket
import sys
import time

from osvm.runtimes.microvm.protocol import (
    FrameParser,
    MessageType,
    ProtocolError,
    decode_exec_result,
    encode_exec,
    encode_frame,
    encode_keepalive,
)

# Exit status when the command could not be run at all, as with `docker exec`.
UNREACHABLE_STATUS = 125
DEFAULT_TIMEOUT = 60.0
# The helper sends KEEPALIVE this often while it waits. When it is killed (a probe timed out), the
# agent kills the command after KEEPALIVE_TIMEOUT without one, instead of at the command's timeout.
KEEPALIVE_INTERVAL = 1.0
KEEPALIVE_TIMEOUT = 5.0
# After the command's timeout, how long to wait for the agent's result of the killed command.
RESULT_GRACE = 5.0


class GuestExecError(Exception):
    """The agent could not be reached, or it rejected the request or closed the connection."""


def run_in_guest(socket_path: str, argv: list[str], timeout: float = DEFAULT_TIMEOUT) -> tuple[int, bytes]:
    """Run argv in the guest and return (exit code, output tail).

    Raises GuestExecError when the socket cannot be reached or no result arrives within timeout seconds.
    """
    request_id = secrets.randbits(31)
    # The agent kills the command at `timeout` and then sends its result.
    deadline = time.monotonic() + timeout + RESULT_GRACE
    with _connect(socket_path, timeout) as connection:
        connection.sendall(encode_exec(request_id, argv, int(timeout * 1000), int(KEEPALIVE_TIMEOUT * 1000)))
        parser = FrameParser()
        next_keepalive = time.monotonic() + KEEPALIVE_INTERVAL
        while True:
            if time.monotonic() >= next_keepalive:
                connection.sendall(encode_keepalive(request_id))
                next_keepalive = time.monotonic() + KEEPALIVE_INTERVAL
            for frame in _receive(connection, parser, min(deadline, next_keepalive), deadline):
                if frame.type == MessageType.EXEC_RESULT:
                    result = decode_exec_result(frame.payload)
                    if result.request_id == request_id:
                        return result.code, result.output
                elif frame.type == MessageType.ERROR:
                    raise GuestExecError(f"the guest agent rejected the request: {frame.payload[4:].decode(errors='replace')}")


def echo(socket_path: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send data to the agent and return its echo; used to measure the channel's round trip."""
    deadline = time.monotonic() + timeout
    with _connect(socket_path, timeout) as connection:
        connection.sendall(encode_frame(MessageType.ECHO, data))
        parser = FrameParser()
        while True:
            for frame in _receive(connection, parser, deadline, deadline):
                if frame.type == MessageType.ECHO_REPLY:
                    return frame.payload


def _connect(socket_path: str, timeout: float) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(timeout)
    try:
        connection.connect(socket_path)
    except OSError as error:
        connection.close()
        raise GuestExecError(f"cannot connect to the guest agent at {socket_path}: {error.strerror or error}") from None
    return connection


def _receive(connection: socket.socket, parser: FrameParser, wake: float, deadline: float) -> list:
    """Return the frames that arrive before wake (none when wake passes first).

    Raises GuestExecError once deadline has passed or the connection closes.
    """
    if time.monotonic() >= deadline:
        raise GuestExecError("timed out waiting for the guest agent")
    connection.settimeout(max(wake - time.monotonic(), 0.001))
    try:
        data = connection.recv(65536)
    except TimeoutError:
        if time.monotonic() >= deadline:
            raise GuestExecError("timed out waiting for the guest agent") from None
        return []
    if not data:
        raise GuestExecError("the guest agent connection closed before the result arrived (is the VM running?)")
    return parser.feed(data)


def main(arguments: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m osvm.runtimes.microvm.guest_exec", description="Run a command inside a microVM."
    )
    parser.add_argument("--socket", required=True, help="the instance's exec.sock")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help=f"seconds before the command is killed (default {DEFAULT_TIMEOUT:g})"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the program and its arguments, after --")
    options = parser.parse_args(arguments)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    if not command:
        parser.error("no command given: write it after --")
    started = time.monotonic()
    try:
        code, output = run_in_guest(options.socket, command, options.timeout)
    except (GuestExecError, ProtocolError) as error:
        print(f"guest_exec: {error}", file=sys.stderr)
        return UNREACHABLE_STATUS
    os.write(sys.stdout.fileno(), output)
    if code == 128 + signal.SIGKILL and time.monotonic() - started >= options.timeout:
        print(f"guest_exec: the command did not finish within {options.timeout:g} s and was killed", file=sys.stderr)
    return code if 0 <= code <= 255 else UNREACHABLE_STATUS


if __name__ == "__main__":
    sys.exit(main())
