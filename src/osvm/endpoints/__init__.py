"""The data plane: a component's stable address that forwards to its healthy instances.

An Endpoint listens on the address that the deployment file sets in `endpoint.listen` and
forwards HTTP requests (mode "http") or TCP connections (mode "tcp") to the current set of
backends. The daemon switches the set with set_backends() during a blue-green update and
then calls drain() for the instance that left the set.
"""

from osvm.endpoints.backends import Backend
from osvm.endpoints.endpoint import Endpoint
from osvm.endpoints.listener import EndpointError

__all__ = ["Backend", "Endpoint", "EndpointError"]
