"""An instance's network namespace and its firewall, set up and torn down the same way by every runtime."""

import logging

from osvm.runtimes.base import LaunchPlan
from osvm.runtimes.netns import InstanceNetwork, NetworkError
from osvm.security.firewall import FirewallError, NamespaceFirewall

logger = logging.getLogger("osvm.runtimes.network")


class NetworkSetupError(Exception):
    """The namespace or its firewall could not be created; nothing of it is left."""


def create_instance_network(plan: LaunchPlan) -> InstanceNetwork:
    """Create the instance's namespace and veth pair, then load its firewall.

    A namespace left by an earlier run of the same instance is removed first. Raises
    NetworkSetupError naming the step that failed, after removing what was made.
    """
    assert plan.addressing is not None
    existing = InstanceNetwork.open(plan.instance_id)
    if existing is not None:
        existing.remove()
    try:
        network = InstanceNetwork.create(plan.instance_id, plan.addressing)
    except NetworkError as error:
        raise NetworkSetupError(f"cannot create the network namespace of instance {plan.instance_id}: {error}") from None
    if plan.firewall is None:
        return network

    ingress, egress = plan.firewall
    try:
        NamespaceFirewall(network.netns_name).apply(ingress, egress)
    except FirewallError as error:
        network.remove()
        raise NetworkSetupError(f"cannot load the firewall of instance {plan.instance_id}: {error}") from None
    logger.info(
        "firewall of instance %s: default drop, %d ingress and %d egress rules",
        plan.instance_id, len(ingress), len(egress),
    )
    return network


def remove_instance_network(instance_id: str) -> None:
    """Remove the instance's namespace and veth pair if they exist; log a failure and go on."""
    network = InstanceNetwork.open(instance_id)
    if network is None:
        return
    try:
        network.remove()
    except NetworkError as error:
        logger.error("cannot remove the network namespace of instance %s: %s", instance_id, error)
