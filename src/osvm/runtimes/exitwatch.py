"""Seeing a process exit at once, without polling: a pidfd registered with the event loop."""

import asyncio
import os


def watch_exit(pid: int) -> "asyncio.Future[None]":
    """Return a future that completes when the process exits, seen through a pidfd without polling.

    The pidfd becomes readable when the process exits. One reader per process owns the pidfd, and
    every waiter shares its future.
    """
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        exited.set_result(None)
        return exited

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_exit)
    return exited
