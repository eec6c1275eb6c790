"""Evaluation of the deployment's [policy]: may component A connect to port P of component B?

Between components the default is deny. A deny rule that matches wins over every allow rule, and
among the matching rules of one kind the first in file order names the decision. A rule matches
when its `from` pattern matches the source, its `to` pattern matches the destination, and its ports
contain the port name or "*". A pattern is "*" (every component), "prefix*" (names that start with
prefix) or an exact name.

A public endpoint accepts every client without consulting the policy. PolicyEngine does not read
endpoint settings, so a caller that serves an endpoint uses `decide_for_endpoint`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from osvm.config.models import Endpoint, Policy, PolicyRule

# The decision cache and the rule lists built per destination are cleared when they reach these
# sizes, so that a stream of distinct names cannot grow them without bound. A deployment has far
# fewer components than MAX_CACHED_DESTINATIONS.
MAX_CACHED_DECISIONS = 65536
MAX_CACHED_DESTINATIONS = 4096


@dataclass(frozen=True)
class Decision:
    """The outcome of one policy check and the rule that produced it."""

    allowed: bool
    # Such as 'allow[2] from "indexer" to "rpc" ports ["rpc"]', where 2 is the rule's index in
    # its list, or 'default deny (no rule matches)'.
    rule: str
    # "allow", "deny" or "default", or "public" from decide_for_endpoint.
    kind: str


DEFAULT_DENY = Decision(allowed=False, rule="default deny (no rule matches)", kind="default")
PUBLIC_ENDPOINT = Decision(allowed=True, rule="public endpoint (policy not applied)", kind="public")


def describe_rule(kind: str, index: int, rule: PolicyRule) -> str:
    """Format a rule as the deployment file lists it, such as 'deny[0] from "*" to "rpc" ports ["*"]'."""
    return (
        f"{kind}[{index}] from {json.dumps(rule.source)} to {json.dumps(rule.to)} "
        f"ports {json.dumps(list(rule.ports))}"
    )


class _CompiledRule(NamedTuple):
    """A rule as the indexes store it."""

    # Position in the allow or deny list. The lowest matching index names the decision.
    index: int
    # The `from` pattern, without the trailing "*" when source_is_prefix is set ("*" becomes "").
    source: str
    source_is_prefix: bool
    # None when the rule lists "*" among its ports.
    ports: frozenset[str] | None
    decision: Decision


def _compile(kind: str, index: int, rule: PolicyRule) -> _CompiledRule:
    # "*" is the empty prefix, which every name starts with.
    source_is_prefix = rule.source.endswith("*")
    return _CompiledRule(
        index=index,
        source=rule.source[:-1] if source_is_prefix else rule.source,
        source_is_prefix=source_is_prefix,
        ports=None if "*" in rule.ports else frozenset(rule.ports),
        decision=Decision(allowed=kind == "allow", rule=describe_rule(kind, index, rule), kind=kind),
    )


class _RuleIndex:
    """The rules of one kind (allow or deny), indexed by destination.

    Rules with an exact `to` are stored under that name. Rules with "*" or "prefix*" are stored
    under the prefix ("" for "*"), so the candidates for a destination are found with one lookup per
    prefix length of its name instead of a scan of every wildcard rule.
    """

    def __init__(self, kind: str, rules: list[PolicyRule]) -> None:
        self.by_destination: dict[str, list[_CompiledRule]] = {}
        self.by_destination_prefix: dict[str, list[_CompiledRule]] = {}
        for index, rule in enumerate(rules):
            compiled = _compile(kind, index, rule)
            if rule.to.endswith("*"):
                self.by_destination_prefix.setdefault(rule.to[:-1], []).append(compiled)
            else:
                self.by_destination.setdefault(rule.to, []).append(compiled)
        self._prefix_lengths = sorted({len(prefix) for prefix in self.by_destination_prefix})

    def candidates(self, destination: str) -> _DestinationRules:
        """Return the rules whose `to` matches destination."""
        found = list(self.by_destination.get(destination, ()))
        for length in self._prefix_lengths:
            if length > len(destination):
                break
            found.extend(self.by_destination_prefix.get(destination[:length], ()))
        found.sort(key=lambda rule: rule.index)
        return _DestinationRules(found)


# A rule as _DestinationRules stores it, after the index lookups matched its source and destination:
# the rule index, its port names (None for every port) and its decision.
_Entry = tuple[int, frozenset[str] | None, Decision]


class _DestinationRules:
    """The rules of one kind whose `to` matches one destination, indexed by their `from`.

    Rules with an exact `from` are stored under that name, and rules with "*" or "prefix*" under
    the prefix, as _RuleIndex does for destinations. Each bucket is in file order.
    """

    __slots__ = ("by_source", "by_source_prefix", "prefix_lengths")

    def __init__(self, rules: list[_CompiledRule]) -> None:
        """Index rules, which must come in file order."""
        by_source: dict[str, list[_Entry]] = {}
        by_source_prefix: dict[str, list[_Entry]] = {}
        for rule in rules:
            buckets = by_source_prefix if rule.source_is_prefix else by_source
            buckets.setdefault(rule.source, []).append((rule.index, rule.ports, rule.decision))
        self.by_source = {source: tuple(entries) for source, entries in by_source.items()}
        self.by_source_prefix = {prefix: tuple(entries) for prefix, entries in by_source_prefix.items()}
        self.prefix_lengths = tuple(sorted({len(prefix) for prefix in by_source_prefix}))

    def first_match(self, source: str, port: str) -> Decision | None:
        """Return the decision of the matching rule that comes first in the file, or None."""
        first_index = sys.maxsize
        first_decision = None
        buckets = [self.by_source.get(source)]
        for length in self.prefix_lengths:
            if length > len(source):
                break
            buckets.append(self.by_source_prefix.get(source[:length]))

        for bucket in buckets:
            if bucket is None:
                continue
            # A bucket is in file order, so its first rule that accepts the port is its match.
            for index, ports, decision in bucket:
                if index >= first_index:
                    break
                if ports is None or port in ports:
                    first_index = index
                    first_decision = decision
                    break
        return first_decision


class _CompiledPolicy:
    """One policy ready for evaluation, with its caches. A new policy gets a new instance."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.deny = _RuleIndex("deny", policy.deny)
        self.allow = _RuleIndex("allow", policy.allow)
        # The rules whose `to` matches a destination, built on the first evaluation for it.
        self.candidates: dict[str, tuple[_DestinationRules, _DestinationRules]] = {}
        self.decisions: dict[tuple[str, str, str], Decision] = {}

    def evaluate(self, source: str, destination: str, port: str) -> Decision:
        candidates = self.candidates.get(destination)
        if candidates is None:
            candidates = (self.deny.candidates(destination), self.allow.candidates(destination))
            if len(self.candidates) >= MAX_CACHED_DESTINATIONS:
                self.candidates.clear()
            self.candidates[destination] = candidates

        deny_rules, allow_rules = candidates
        decision = deny_rules.first_match(source, port)
        if decision is not None:
            return decision
        decision = allow_rules.first_match(source, port)
        if decision is not None:
            return decision
        return DEFAULT_DENY


class PolicyEngine:
    """Decides connections between components by a Policy, with a cache of past decisions.

    set_policy() swaps in the compiled policy and its empty caches as one object, so a decision
    never comes from an older policy than the one last set, also with decide() running in other
    threads.
    """

    def __init__(self, policy: Policy) -> None:
        self._compiled = _CompiledPolicy(policy)

    @property
    def policy(self) -> Policy:
        return self._compiled.policy

    def set_policy(self, policy: Policy) -> None:
        """Compile policy and make it the one that decide() applies, dropping every cached decision."""
        self._compiled = _CompiledPolicy(policy)

    def decide(self, source: str, destination: str, port: str) -> Decision:
        """Decide whether component source may connect to the port named port of destination."""
        compiled = self._compiled
        key = (source, destination, port)
        decision = compiled.decisions.get(key)
        if decision is not None:
            return decision

        decision = compiled.evaluate(source, destination, port)
        if len(compiled.decisions) >= MAX_CACHED_DECISIONS:
            compiled.decisions.clear()
        compiled.decisions[key] = decision
        return decision

    def evaluate(self, source: str, destination: str, port: str) -> Decision:
        """Decide like decide(), but without reading or filling the decision cache."""
        return self._compiled.evaluate(source, destination, port)

    def allowed_sources(self, destination: str, port: str, components: Iterable[str]) -> list[str]:
        """Return the components that may connect to port of destination, in the order given."""
        return [source for source in components if self.decide(source, destination, port).allowed]

    def allowed_destinations(self, source: str, components: dict[str, list[str]]) -> list[tuple[str, str]]:
        """Return the (component, port name) pairs that source may connect to.

        components maps each component name to its port names. The pairs come in that order, and
        source itself is included only where a rule allows it like any other component.
        """
        return [
            (destination, port)
            for destination, ports in components.items()
            for port in ports
            if self.decide(source, destination, port).allowed
        ]


def decide_for_endpoint(
    engine: PolicyEngine, endpoint: Endpoint | None, source: str, destination: str, port: str
) -> Decision:
    """Decide a connection that arrives through endpoint: allowed when it is public, else by policy."""
    if endpoint is not None and endpoint.public:
        return PUBLIC_ENDPOINT
    return engine.decide(source, destination, port)
