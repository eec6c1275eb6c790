"""Endpoint listening sockets kept open while the daemon executes itself again.

`osvm daemon-restart` and SIGHUP make the daemon stop accepting, finish its requests in flight
and exec its own command line, which loads the osvm code now installed. The endpoints'
listening sockets stay open across exec, so clients that connect meanwhile wait in the kernel's
accept queue instead of being refused. The new daemon adopts the instances, as after any restart,
and serves the queued connections.
"""

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

logger = logging.getLogger("osvm.daemon")

# At a restart in place, requests in flight on the endpoints get this long by default to complete
# before the daemon closes their connections and executes itself again. New connections wait in
# the accept queues meanwhile.
RESTART_DRAIN_TIMEOUT = 10.0
MAX_RESTART_DRAIN_TIMEOUT = 3600.0
# Bounds the check that the installed osvm starts, which imports its modules in a new interpreter.
CODE_CHECK_TIMEOUT = 60.0

# The environment variable that lists the inherited sockets: a JSON list of
# {"component", "listen", "fd"} objects.
ENVIRONMENT_VARIABLE = "OSVM_INHERITED_LISTENERS"
# The environment variable with the descriptor of the state directory's locked pid file. The lock
# stays held across exec, so no other daemon can take the state directory in between.
LOCK_VARIABLE = "OSVM_INHERITED_LOCK"


@dataclass
class InheritedListener:
    """A listening socket of a component's endpoint, opened by the previous daemon process."""

    component: str
    listen: str
    sock: socket.socket


async def check_installed_code() -> str:
    """Import the installed daemon and CLI in a new interpreter, as the restart will, and return the error or ""."""
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import osvm.cli.main, osvm.daemon.daemon",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as error:
        return f"cannot run {sys.executable}: {error}"
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), CODE_CHECK_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        return f"importing osvm took longer than {CODE_CHECK_TIMEOUT:g} s"
    if process.returncode != 0:
        lines = stderr.decode(errors="replace").strip().splitlines()
        return f"{sys.executable} -c 'import osvm.cli.main, osvm.daemon.daemon' failed: {lines[-1] if lines else f'status {process.returncode}'}"
    return ""


def take_inherited(environ: dict[str, str] | None = None) -> dict[str, InheritedListener]:
    """Return the listening sockets named in the environment, by component, and remove the variable.

    A file descriptor that is not a listening stream socket is logged and skipped.
    """
    environ = os.environ if environ is None else environ
    text = environ.pop(ENVIRONMENT_VARIABLE, None)
    if not text:
        return {}
    try:
        entries = json.loads(text)
        listeners = [(str(entry["component"]), str(entry["listen"]), int(entry["fd"])) for entry in entries]
    except (ValueError, TypeError, KeyError) as error:
        logger.error("ignored invalid %s %r: %s", ENVIRONMENT_VARIABLE, text, error)
        return {}

    inherited: dict[str, InheritedListener] = {}
    for component, listen, fd in listeners:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as error:
            logger.error("endpoint %s: inherited file descriptor %d for %s is not a socket: %s", component, fd, listen, error)
            continue
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            logger.error("endpoint %s: inherited file descriptor %d for %s is not a listening stream socket", component, fd, listen)
            sock.close()
            continue
        # Not passed to child processes. reexec() makes it inheritable again for the next restart.
        sock.set_inheritable(False)
        inherited[component] = InheritedListener(component, listen, sock)
    return inherited


def take_inherited_lock(expected: str, environ: dict[str, str] | None = None) -> int | None:
    """Return the inherited descriptor of the locked pid file if it is the file at `expected`, and remove the variable."""
    environ = os.environ if environ is None else environ
    text = environ.pop(LOCK_VARIABLE, None)
    if not text:
        return None
    try:
        fd = int(text)
        inherited = os.fstat(fd)
        current = os.stat(expected)
    except (ValueError, OSError) as error:
        logger.error("ignored the inherited lock %r: %s", text, error)
        return None
    if (inherited.st_dev, inherited.st_ino) != (current.st_dev, current.st_ino):
        logger.error("ignored the inherited lock %r: it is not %s", text, expected)
        os.close(fd)
        return None
    os.set_inheritable(fd, False)
    return fd


def reexec(listeners: list[tuple[str, str, int]], lock_fd: int | None) -> NoReturn:
    """Execute this daemon's command line again, passing the (component, listen, fd) listeners and the lock on.

    Runs `python -m osvm` with the same arguments, so the new process loads the installed code.
    SIGHUP is ignored until the new process installs its handler, because its default action
    would end the daemon.
    """
    for _, _, fd in listeners:
        os.set_inheritable(fd, True)
    environ = dict(os.environ)
    environ[ENVIRONMENT_VARIABLE] = json.dumps(
        [{"component": component, "listen": listen, "fd": fd} for component, listen, fd in listeners]
    )
    if lock_fd is not None:
        os.set_inheritable(lock_fd, True)
        environ[LOCK_VARIABLE] = str(lock_fd)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    argv = [sys.executable, "-m", "osvm", *sys.argv[1:]]
    logger.info("executing %s with the listening sockets of %d endpoint(s) kept open", " ".join(argv), len(listeners))
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execve(sys.executable, argv, environ)
