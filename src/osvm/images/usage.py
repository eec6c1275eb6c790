"""Find the instances that use a cached image, so that removing it does not break their restarts.

A microVM instance records the digest of its image in <state_dir>/instances/<id>/microvm.json from
prepare until cleanup, and QEMU reads the image's files again at every restart of the instance.
The store's instances table gives the component and state of each instance. Both are read from
the state directory, so the check works whether or not the daemon runs.
"""

import json
import logging
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from osvm import paths
from osvm.images.build import BuiltImage, ImageError, get_image, remove_image
from osvm.store.db import LIVE_STATES

logger = logging.getLogger("osvm.images")

# The file in an instance directory that names the instance's image (STATE_FILE of the microvm runtime).
VM_STATE_FILE = "microvm.json"
# Shown for an instance that has a microvm.json but no row in the store.
UNKNOWN = "unknown"


@dataclass(frozen=True)
class ImageUser:
    """A live instance whose VM boots from an image."""

    component: str
    instance: str
    # The instance state in the store, such as "running" or "backoff".
    state: str

    def describe(self) -> str:
        return f"{self.component} (instance {self.instance}, {self.state})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ImageInUseError(ImageError):
    """A live instance uses the image that was to be removed."""

    def __init__(self, image: BuiltImage, users: list["ImageUser"]):
        self.image = image
        self.users = users
        names = ", ".join(user.describe() for user in users)
        components = " ".join(sorted({user.component for user in users if user.component != UNKNOWN})) or "COMPONENT"
        super().__init__(
            f"image {image.short_digest} is in use by {names}, and removing it makes their next restart "
            f"fail: stop them first with `osvm stop {components}`, or run `osvm image rm --force "
            f"{image.short_digest}` to remove it anyway"
        )


def image_users(state_dir: Path, digest: str) -> list[ImageUser]:
    """Return the live instances whose microvm.json names the image `digest` (a full digest).

    An instance whose store row shows it stopped, exited or failed does not count. An instance
    without a row, or any instance when the store cannot be read, counts as live, because the
    check must not let an image go that an instance may still need.
    """
    instances_dir = Path(state_dir) / "instances"
    if not instances_dir.is_dir():
        return []
    using = []
    for state_file in sorted(instances_dir.glob(f"*/{VM_STATE_FILE}")):
        try:
            recorded = json.loads(state_file.read_text()).get("image")
        except (OSError, ValueError, AttributeError) as error:
            logger.warning("cannot read %s, so its image is unknown: %s", state_file, error)
            continue
        if recorded == digest:
            using.append(state_file.parent.name)
    if not using:
        return []
    rows = _instance_rows(paths.database_path(Path(state_dir)), using)
    users = []
    for instance_id in using:
        component, state = rows.get(instance_id, (UNKNOWN, UNKNOWN))
        if state == UNKNOWN or state in LIVE_STATES:
            users.append(ImageUser(component=component, instance=instance_id, state=state))
    return users


def remove_image_unless_used(
    cache_dir: Path, state_dir: Path, digest: str, force: bool = False
) -> tuple[BuiltImage, list[ImageUser]]:
    """Remove a cached image by digest or unique prefix unless a live instance uses it.

    Returns the removed image and the live instances that use it, which is non-empty only with
    `force`. Raises ImageInUseError when an instance uses it and `force` is false, and
    ImageError when no single image matches.
    """
    image = get_image(Path(cache_dir), digest)
    users = image_users(state_dir, image.digest)
    if users and not force:
        raise ImageInUseError(image, users)
    # NOTE: an instance that the daemon prepares at this moment records the image only after its
    # build step returns, so a removal in that window is not seen here.
    remove_image(Path(cache_dir), image.digest)
    return image, users


def _instance_rows(database: Path, instance_ids: list[str]) -> dict[str, tuple[str, str]]:
    """Return (component, state) by instance id from the store, read-only; empty when it cannot be read."""
    if not database.exists():
        return {}
    marks = ", ".join("?" for _ in instance_ids)
    try:
        connection = sqlite3.connect(database.absolute().as_uri() + "?mode=ro", uri=True, timeout=5.0)
        try:
            rows = connection.execute(
                f"SELECT id, component, state FROM instances WHERE id IN ({marks})", instance_ids
            ).fetchall()
        finally:
            connection.close()
    except sqlite3.Error as error:
        logger.warning("cannot read the instances in %s, so every instance with the image counts as live: %s", database, error)
        return {}
    return {instance_id: (component, state) for instance_id, component, state in rows}
