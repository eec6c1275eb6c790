"""Events: every state change, stored with its time and a readable reason, and sent to followers."""

import asyncio
import logging
from typing import Callable

from osvm.store.db import Event, Store

logger = logging.getLogger("osvm.events")

# A follower that falls this far behind loses its oldest events instead of growing memory without bound.
FOLLOWER_QUEUE_SIZE = 10_000


class EventBus:
    """Record events in the store and fan them out to `osvm events -f` followers."""

    def __init__(self, store: Store, on_publish: "Callable[[Event], None] | None" = None):
        self.store = store
        self.on_publish = on_publish
        self._followers: set[asyncio.Queue[Event]] = set()

    def publish(self, kind: str, reason: str, component: str = "", instance: str = "", level: int = logging.INFO) -> Event:
        event = self.store.add_event(kind, reason, component, instance)
        subject = " ".join(part for part in (component, instance) if part)
        logger.log(level, "%s: %s: %s", subject or "daemon", kind, reason)
        if self.on_publish is not None:
            self.on_publish(event)
        for queue in list(self._followers):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)
        return event

    def follow(self) -> "asyncio.Queue[Event]":
        queue: asyncio.Queue[Event] = asyncio.Queue(FOLLOWER_QUEUE_SIZE)
        self._followers.add(queue)
        return queue

    def unfollow(self, queue: "asyncio.Queue[Event]") -> None:
        self._followers.discard(queue)
