"""Locations of osvm's state: the state directory and the files inside it."""

import os
from pathlib import Path

ENV_STATE_DIR = "OSVM_STATE_DIR"


def default_state_dir() -> Path:
    """Return $OSVM_STATE_DIR, else /var/lib/osvm for root, else ~/.local/state/osvm."""
    configured = os.environ.get(ENV_STATE_DIR)
    if configured:
        return Path(configured).absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/osvm")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "osvm"


def socket_path(state_dir: Path) -> Path:
    return state_dir / "osvm.sock"


def database_path(state_dir: Path) -> Path:
    return state_dir / "state.db"


def daemon_log_path(state_dir: Path) -> Path:
    return state_dir / "daemon.log"


def pid_path(state_dir: Path) -> Path:
    return state_dir / "daemon.pid"


def instance_dir(state_dir: Path, instance_id: str) -> Path:
    return state_dir / "instances" / instance_id


def data_dir(state_dir: Path, instance_id: str) -> Path:
    return state_dir / "data" / instance_id


def output_log(state_dir: Path, instance_id: str) -> Path:
    return instance_dir(state_dir, instance_id) / "output.log"
