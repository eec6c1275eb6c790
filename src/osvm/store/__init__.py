from osvm.store.db import (
    ACTIVE_ROLLOUT_STATES,
    LIVE_STATES,
    ComponentRecord,
    Event,
    InstanceRecord,
    RolloutRecord,
    Store,
)

__all__ = [
    "ACTIVE_ROLLOUT_STATES",
    "LIVE_STATES",
    "ComponentRecord",
    "Event",
    "InstanceRecord",
    "RolloutRecord",
    "Store",
]
