"""Endpoint listening sockets kept open while the daemon executes itself again.

`osvm daemon-restart` and SIGHUP make the daemon stop accepting, finish its requests in flight
and exec its own command line, which loads the osvm code now installed. The endpoints'
listening sockets stay open across exec, so clients that connect meanwhile wait in the kernel's
accept queue instead of being refused. The new daemon adopts the instances, as after any restart,
and serves the queued connections.
"""

import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

logger = logging.getLogger("osvm.daemon")

# The environment variable that lists the inherited sockets: a JSON list of
# {"component", "listen", "fd"} objects.
ENVIRONMENT_VARIABLE = "OSVM_INHERITED_LISTENERS"


@dataclass
class InheritedListener:
    """A listening socket of a component's endpoint, opened by the previous daemon process."""

    component: str
    listen: str
    sock: socket.socket


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
        # The sockets passed on by a later restart are made inheritable again on purpose.
        sock.set_inheritable(False)
        inherited[component] = InheritedListener(component, listen, sock)
    return inherited


def reexec(listeners: list[tuple[str, str, int]]) -> NoReturn:
    """Execute this daemon's command line again, passing the (component, listen, fd) listeners on.

    Runs `python -m osvm` with the same arguments, so the new process loads the installed code.
    """
    for _, _, fd in listeners:
        os.set_inheritable(fd, True)
    environ = dict(os.environ)
    environ[ENVIRONMENT_VARIABLE] = json.dumps(
        [{"component": component, "listen": listen, "fd": fd} for component, listen, fd in listeners]
    )
    argv = [sys.executable, "-m", "osvm", *sys.argv[1:]]
    logger.info("executing %s with %d endpoint listening sockets kept open", " ".join(argv), len(listeners))
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execve(sys.executable, argv, environ)
