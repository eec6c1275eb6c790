from osvm.store.db import LIVE_STATES, ComponentRecord, Event, InstanceRecord, Store

__all__ = ["LIVE_STATES", "ComponentRecord", "Event", "InstanceRecord", "Store"]
