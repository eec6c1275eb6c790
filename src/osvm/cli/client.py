"""Client of the daemon's control API over its Unix socket."""

import fcntl
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx

from osvm import paths

# Stopping waits out grace periods, which the deployment file sets; this bounds the wait.
STOP_TIMEOUT = 900.0

# Seconds `osvm up` waits for a daemon that it started to accept requests.
DAEMON_START_TIMEOUT = 15.0


class ClientError(Exception):
    """A request failed. The message is the daemon's error, or how to reach the daemon."""


class Client:
    def __init__(self, state_dir: Path, timeout: float = 30.0):
        self.state_dir = state_dir
        self.socket = paths.socket_path(state_dir)
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://osvm", timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def is_running(self) -> bool:
        try:
            self._http.get("/v1/ping", timeout=2.0)
        except (httpx.TransportError, OSError):
            return False
        return True

    def ensure_daemon(self) -> bool:
        """Start a background daemon on this state directory unless one is running; return True if started.

        A daemon that holds the state directory's lock but does not respond yet, such as one that
        restarts in place, is waited for instead of started again.
        """
        if self.is_running():
            return False
        holder = self.lock_holder()
        if holder is not None:
            if self._wait_running():
                return False
            raise ClientError(
                f"the daemon (pid {holder}) locks {self.state_dir} but did not respond on {self.socket} within "
                f"{DAEMON_START_TIMEOUT:g} s: read its log, or stop it and run the command again"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(paths.daemon_log_path(self.state_dir), "ab")
        subprocess.Popen(
            [sys.executable, "-m", "osvm", "--state-dir", str(self.state_dir), "daemon"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=dict(os.environ),
        )
        log.close()
        if self._wait_running():
            return True
        raise ClientError(
            f"the daemon did not respond on {self.socket} within {DAEMON_START_TIMEOUT:g} s: "
            f"read {paths.daemon_log_path(self.state_dir)} for its errors"
        )

    def _wait_running(self) -> bool:
        """Wait up to DAEMON_START_TIMEOUT for the daemon to respond, and return whether it did."""
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.is_running():
                return True
            time.sleep(0.1)
        return False

    def get(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        if timeout is None:
            return self._request("POST", path, json=body or {})
        return self._request("POST", path, json=body or {}, timeout=timeout)

    def stream(self, path: str, **params: Any) -> Iterator[bytes]:
        with self.open_stream(path, **params) as response:
            yield from response.iter_raw()

    @contextmanager
    def open_stream(self, path: str, **params: Any) -> Iterator[httpx.Response]:
        """Send a GET whose body streams, and yield the response once its status is a success.

        Read the body with iter_raw() inside the block. Raises ClientError for an error status or
        when the daemon cannot be reached, also while the body is read.
        """
        try:
            with self._http.stream("GET", path, params=params, timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(_error_message(response))
                yield response
        except httpx.TransportError as error:
            raise ClientError(self._unreachable(error)) from None

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ClientError(self._unreachable(error)) from None
        if response.status_code >= 400:
            raise ClientError(_error_message(response))
        return response.json()

    def _unreachable(self, error: Exception) -> str:
        holder = self.lock_holder()
        if holder is not None:
            return (
                f"the osvm daemon (pid {holder}) holds {self.state_dir} but does not respond on {self.socket} "
                f"({error}): it may be restarting, so run the command again in a few seconds"
            )
        return (
            f"cannot reach the osvm daemon on {self.socket} ({error}): start it with `osvm daemon` "
            f"or `osvm up FILE`, and check --state-dir"
        )

    def lock_holder(self) -> str | None:
        """Return the pid (as written, or "unknown") of the daemon that locks the state directory, or None."""
        try:
            with open(paths.pid_path(self.state_dir)) as pid_file:
                try:
                    fcntl.flock(pid_file, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return pid_file.read().strip() or "unknown"
                fcntl.flock(pid_file, fcntl.LOCK_UN)
        except OSError:
            # No pid file, or one this user cannot read: no daemon is known to hold the directory.
            return None
        return None


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return f"the daemon returned HTTP {response.status_code}: {response.text[:200]}"
