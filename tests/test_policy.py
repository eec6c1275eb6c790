"""Tests of osvm.security.policy: rule matching, deny precedence, queries and the decision cache."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from osvm.config.models import Endpoint, Policy
from osvm.security.policy import DEFAULT_DENY, Decision, PolicyEngine, decide_for_endpoint


def make_policy(allow: Sequence[dict] = (), deny: Sequence[dict] = ()) -> Policy:
    """Build a Policy from rule tables written with the TOML key "from"."""
    return Policy.model_validate({"allow": list(allow), "deny": list(deny)})


# Rules shared by the table below. The index of each rule in its list is part of the expected text.
ALLOW = [
    {"from": "indexer", "to": "rpc", "ports": ["rpc"]},  # allow[0]
    {"from": "indexer-*", "to": "db", "ports": ["pg"]},  # allow[1]
    {"from": "*", "to": "metrics", "ports": ["*"]},  # allow[2]
    {"from": "gateway", "to": "rpc*", "ports": ["rpc", "ws"]},  # allow[3]
    {"from": "*", "to": "rpc", "ports": ["rpc"]},  # allow[4]
    {"from": "admin", "to": "*"},  # allow[5], ports default to ["*"]
]
DENY = [
    {"from": "indexer-bad", "to": "db"},  # deny[0]
    {"from": "*", "to": "rpc", "ports": ["admin"]},  # deny[1]
    {"from": "legacy-*", "to": "*"},  # deny[2]
    {"from": "legacy-old", "to": "metrics"},  # deny[3], always shadowed by deny[2]
]

CASES = [
    # (source, destination, port, allowed, kind, rule)
    ("web", "db", "pg", False, "default", "default deny (no rule matches)"),
    ("indexer", "rpc", "rpc", True, "allow", 'allow[0] from "indexer" to "rpc" ports ["rpc"]'),
    ("indexer", "rpc", "ws", False, "default", "default deny (no rule matches)"),
    ("indexer-1", "db", "pg", True, "allow", 'allow[1] from "indexer-*" to "db" ports ["pg"]'),
    ("indexer-1", "db", "admin", False, "default", "default deny (no rule matches)"),
    # "indexer-*" needs the dash, so "indexer" itself is not in the prefix.
    ("indexer", "db", "pg", False, "default", "default deny (no rule matches)"),
    ("anyone", "metrics", "http", True, "allow", 'allow[2] from "*" to "metrics" ports ["*"]'),
    ("anyone", "metrics", "other", True, "allow", 'allow[2] from "*" to "metrics" ports ["*"]'),
    ("gateway", "rpc-2", "ws", True, "allow", 'allow[3] from "gateway" to "rpc*" ports ["rpc", "ws"]'),
    ("gateway", "rpc-2", "admin", False, "default", "default deny (no rule matches)"),
    # allow[3] and allow[4] both match, and the first in file order names the decision.
    ("gateway", "rpc", "rpc", True, "allow", 'allow[3] from "gateway" to "rpc*" ports ["rpc", "ws"]'),
    ("web", "rpc", "rpc", True, "allow", 'allow[4] from "*" to "rpc" ports ["rpc"]'),
    ("admin", "db", "pg", True, "allow", 'allow[5] from "admin" to "*" ports ["*"]'),
    # Deny overrides allow.
    ("indexer-bad", "db", "pg", False, "deny", 'deny[0] from "indexer-bad" to "db" ports ["*"]'),
    ("admin", "rpc", "admin", False, "deny", 'deny[1] from "*" to "rpc" ports ["admin"]'),
    ("legacy-1", "rpc", "rpc", False, "deny", 'deny[2] from "legacy-*" to "*" ports ["*"]'),
    # Both deny[2] and deny[3] match, and the first in file order is named.
    ("legacy-old", "metrics", "http", False, "deny", 'deny[2] from "legacy-*" to "*" ports ["*"]'),
    # deny[1] names port "admin" only, so other ports of rpc fall through to the allow rules.
    ("admin", "rpc", "rpc", True, "allow", 'allow[4] from "*" to "rpc" ports ["rpc"]'),
    # A prefix pattern on the destination does not match a shorter name.
    ("gateway", "rp", "rpc", False, "default", "default deny (no rule matches)"),
]


@pytest.mark.parametrize(("source", "destination", "port", "allowed", "kind", "rule"), CASES)
def test_decide_table(source, destination, port, allowed, kind, rule):
    engine = PolicyEngine(make_policy(ALLOW, DENY))

    decision = engine.decide(source, destination, port)

    assert decision.allowed is allowed
    assert decision.kind == kind
    assert decision.rule == rule


@pytest.mark.parametrize(("source", "destination", "port", "allowed", "kind", "rule"), CASES)
def test_evaluate_matches_decide(source, destination, port, allowed, kind, rule):
    engine = PolicyEngine(make_policy(ALLOW, DENY))

    assert engine.evaluate(source, destination, port) == Decision(allowed, rule, kind)


def test_decide_empty_policy_denies():
    engine = PolicyEngine(Policy())

    assert engine.decide("a", "b", "http") == DEFAULT_DENY
    assert engine.decide("a", "a", "http") == DEFAULT_DENY


def test_decide_wildcard_everything():
    engine = PolicyEngine(make_policy(allow=[{"from": "*", "to": "*"}]))

    decision = engine.decide("a", "b", "http")

    assert decision.allowed
    assert decision.rule == 'allow[0] from "*" to "*" ports ["*"]'


def test_decide_deny_after_allow_in_file():
    # Precedence comes from the kind, not the position: the allow list is read only when no deny matches.
    engine = PolicyEngine(make_policy(
        allow=[{"from": "*", "to": "*"}],
        deny=[{"from": "a", "to": "b", "ports": ["http"]}],
    ))

    assert engine.decide("a", "b", "http").kind == "deny"
    assert engine.decide("a", "b", "grpc").kind == "allow"
    assert engine.decide("c", "b", "http").kind == "allow"


def test_decide_deny_prefers_lower_index():
    # The exact-destination rule sits in one index and the prefix rule in another, and the lower
    # file index must win whichever index it comes from.
    engine = PolicyEngine(make_policy(deny=[
        {"from": "*", "to": "rpc*"},
        {"from": "*", "to": "rpc"},
    ]))

    assert engine.decide("x", "rpc", "http").rule == 'deny[0] from "*" to "rpc*" ports ["*"]'

    engine = PolicyEngine(make_policy(deny=[
        {"from": "*", "to": "rpc"},
        {"from": "*", "to": "rpc*"},
    ]))

    assert engine.decide("x", "rpc", "http").rule == 'deny[0] from "*" to "rpc" ports ["*"]'


def test_decide_nested_prefixes():
    engine = PolicyEngine(make_policy(allow=[
        {"from": "*", "to": "rpc-eu-*", "ports": ["ws"]},
        {"from": "*", "to": "rpc-*", "ports": ["rpc"]},
        {"from": "*", "to": "r*", "ports": ["metrics"]},
    ]))

    assert engine.decide("x", "rpc-eu-1", "ws").rule.startswith("allow[0]")
    assert engine.decide("x", "rpc-eu-1", "rpc").rule.startswith("allow[1]")
    assert engine.decide("x", "rpc-eu-1", "metrics").rule.startswith("allow[2]")
    assert engine.decide("x", "rpc-us-1", "ws").kind == "default"
    assert engine.decide("x", "db", "metrics").kind == "default"


def test_allowed_sources():
    engine = PolicyEngine(make_policy(ALLOW, DENY))
    components = ["indexer", "indexer-1", "indexer-bad", "legacy-1", "web", "admin"]

    assert engine.allowed_sources("db", "pg", components) == ["indexer-1", "admin"]
    assert engine.allowed_sources("rpc", "rpc", components) == ["indexer", "indexer-1", "indexer-bad", "web", "admin"]
    assert engine.allowed_sources("rpc", "admin", components) == []
    assert engine.allowed_sources("db", "pg", iter(components)) == ["indexer-1", "admin"]


def test_allowed_destinations():
    engine = PolicyEngine(make_policy(ALLOW, DENY))
    components = {
        "rpc": ["rpc", "ws", "admin"],
        "rpc-2": ["rpc", "ws"],
        "db": ["pg"],
        "metrics": ["http"],
    }

    assert engine.allowed_destinations("indexer", components) == [("rpc", "rpc"), ("metrics", "http")]
    assert engine.allowed_destinations("gateway", components) == [
        ("rpc", "rpc"),
        ("rpc", "ws"),
        ("rpc-2", "rpc"),
        ("rpc-2", "ws"),
        ("metrics", "http"),
    ]
    assert engine.allowed_destinations("admin", components) == [
        ("rpc", "rpc"),
        ("rpc", "ws"),
        ("rpc-2", "rpc"),
        ("rpc-2", "ws"),
        ("db", "pg"),
        ("metrics", "http"),
    ]
    assert engine.allowed_destinations("legacy-1", components) == []


def test_set_policy_clears_cache():
    engine = PolicyEngine(make_policy(allow=[{"from": "a", "to": "b"}]))
    assert engine.decide("a", "b", "http").allowed

    engine.set_policy(make_policy(deny=[{"from": "a", "to": "b"}]))

    assert engine.decide("a", "b", "http").kind == "deny"
    assert engine.policy.deny[0].source == "a"

    engine.set_policy(Policy())

    assert engine.decide("a", "b", "http") == DEFAULT_DENY


def test_set_policy_clears_destination_index():
    engine = PolicyEngine(make_policy(allow=[{"from": "a", "to": "b*"}]))
    assert engine.evaluate("a", "b1", "http").allowed

    engine.set_policy(make_policy(allow=[{"from": "a", "to": "c"}]))

    assert engine.evaluate("a", "b1", "http") == DEFAULT_DENY
    assert engine.evaluate("a", "c", "http").allowed


def test_decide_cache_returns_same_decision():
    engine = PolicyEngine(make_policy(ALLOW, DENY))

    first = engine.decide("indexer", "rpc", "rpc")
    second = engine.decide("indexer", "rpc", "rpc")

    assert second is first


def test_decide_cache_is_bounded(monkeypatch):
    monkeypatch.setattr("osvm.security.policy.MAX_CACHED_DECISIONS", 10)
    engine = PolicyEngine(make_policy(allow=[{"from": "*", "to": "*"}]))

    for index in range(25):
        assert engine.decide(f"c{index}", "b", "http").allowed

    assert len(engine._compiled.decisions) <= 10


def test_endpoint_public_skips_policy():
    engine = PolicyEngine(make_policy(deny=[{"from": "*", "to": "*"}]))
    public = Endpoint(listen="127.0.0.1:8545", public=True)
    private = Endpoint(listen="127.0.0.1:8545")

    assert decide_for_endpoint(engine, public, "anyone", "rpc", "rpc").allowed
    assert decide_for_endpoint(engine, public, "anyone", "rpc", "rpc").kind == "public"
    assert decide_for_endpoint(engine, private, "anyone", "rpc", "rpc").kind == "deny"
    assert decide_for_endpoint(engine, None, "anyone", "rpc", "rpc").kind == "deny"


def reference_decide(policy: Policy, source: str, destination: str, port: str) -> tuple[bool, str]:
    """Decide by checking every rule in file order, deny rules first: the definition the index must match."""

    def name_matches(pattern: str, name: str) -> bool:
        return name.startswith(pattern[:-1]) if pattern.endswith("*") else pattern == name

    for kind, rules in (("deny", policy.deny), ("allow", policy.allow)):
        for index, rule in enumerate(rules):
            if (
                name_matches(rule.source, source)
                and name_matches(rule.to, destination)
                and ("*" in rule.ports or port in rule.ports)
            ):
                return kind == "allow", f"{kind}[{index}]"
    return False, "default"


def test_decide_random_policies_match_scan():
    # Names share prefixes at several lengths ("a", "ab", "ab-c"), so that prefix rules of different
    # lengths and exact rules compete for the same query.
    names = ["a", "ab", "ab-c", "ab-cd", "b", "ba", "b-a"]
    patterns = names + ["*", "a*", "ab*", "ab-*", "b*", "b-*"]
    ports = ["p", "q", "r"]
    rng = random.Random(7)

    for _ in range(200):
        def random_rule() -> dict:
            chosen_ports = ["*"] if rng.random() < 0.3 else rng.sample(ports, rng.randint(1, 2))
            return {"from": rng.choice(patterns), "to": rng.choice(patterns), "ports": chosen_ports}

        policy = make_policy(
            allow=[random_rule() for _ in range(rng.randint(0, 12))],
            deny=[random_rule() for _ in range(rng.randint(0, 4))],
        )
        engine = PolicyEngine(policy)
        for source in names:
            for destination in names:
                for port in ports:
                    allowed, rule = reference_decide(policy, source, destination, port)
                    decision = engine.decide(source, destination, port)
                    assert decision.allowed is allowed, (policy, source, destination, port)
                    assert decision.rule.startswith(rule), (policy, source, destination, port, decision)
