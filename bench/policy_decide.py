"""Time PolicyEngine decisions on a generated policy of 1,000 rules.

The policy mixes exact names, group prefixes ("g07-*") and "*" on both sides of each rule, with
allow and deny rules, over 200 components of 4 ports each. The same random (source, destination,
port) queries are timed in these ways:

- cached: decide() with every query already in the decision cache, the common case per connection;
- uncached: evaluate(), which skips the decision cache but uses the per-destination rule lists
  that the first evaluation for a destination builds;
- cold: evaluate() with the per-destination lists cleared before each call, as on the first
  connection to a destination after a policy change, once with the garbage collector enabled and
  once with it disabled;
- linear scan: every rule checked in file order without an index, on fewer queries, as a baseline.

Each decision is timed alone with time.perf_counter_ns, so the per-decision figures include the
timer's own cost, which is reported as timer_overhead. The mean comes from timing the whole loop
once more without a timer per call. decide(), evaluate() and the linear scan must return the same
decision for every query in the pool, or the benchmark exits with an error.

The queries are drawn from a pool of distinct (source, destination, port) triples (5,000 by
default). outcomes counts the timed queries that were allowed, denied by a rule and denied by
default.

Run: .venv/bin/python bench/policy_decide.py [--rules 1000] [--decisions 100000] [--distinct 5000] [--seed 1]
"""

import argparse
import gc
import random
import sys
import time
from collections import Counter
from typing import Any, Callable

import harness
from osvm.config.models import Policy
from osvm.security.policy import DEFAULT_DENY, MAX_CACHED_DECISIONS, Decision, PolicyEngine, describe_rule

GROUPS = 20
COMPONENTS_PER_GROUP = 10
PORTS = ["rpc", "ws", "metrics", "admin"]
# Share of rules that are deny rules.
DENY_SHARE = 0.2
# Shares of exact names and prefixes on each side of a rule, and the rest is "*". They are chosen
# so that the outcomes mix allow, deny and default deny.
ALLOW_SHAPES = (0.75, 0.22)
DENY_SHAPES = (0.75, 0.22)
# Share of prefixes that cover ten groups ("g0*") instead of one ("g07-*").
WIDE_PREFIX_SHARE = 0.1
# The linear scan checks up to every rule per decision, so it runs on fewer queries.
LINEAR_SCAN_DECISIONS = 5000

Query = tuple[str, str, str]


def component_names() -> list[str]:
    return [f"g{group:02d}-s{index}" for group in range(GROUPS) for index in range(COMPONENTS_PER_GROUP)]


def random_pattern(rng: random.Random, components: list[str], shapes: tuple[float, float]) -> str:
    exact_share, prefix_share = shapes
    draw = rng.random()
    if draw < exact_share:
        return rng.choice(components)
    if draw < exact_share + prefix_share:
        group = rng.randrange(GROUPS)
        return f"g{group // 10}*" if rng.random() < WIDE_PREFIX_SHARE else f"g{group:02d}-*"
    return "*"


def random_rule(rng: random.Random, components: list[str], deny: bool) -> dict[str, Any]:
    shapes = DENY_SHAPES if deny else ALLOW_SHAPES
    source = random_pattern(rng, components, shapes)
    destination = random_pattern(rng, components, shapes)
    if rng.random() < 0.3 and not (deny and source == "*" and destination == "*"):
        ports = ["*"]
    else:
        ports = rng.sample(PORTS, rng.randint(1, 2))
    return {"from": source, "to": destination, "ports": ports}


def generate_policy(rng: random.Random, rule_count: int, components: list[str]) -> Policy:
    """Return a policy of rule_count rules, DENY_SHARE of them deny rules.

    A deny rule from "*" to "*" names ports, so that no single rule denies every query.
    """
    allow: list[dict[str, Any]] = []
    deny: list[dict[str, Any]] = []
    for _ in range(rule_count):
        is_deny = rng.random() < DENY_SHARE
        (deny if is_deny else allow).append(random_rule(rng, components, is_deny))
    return Policy.model_validate({"allow": allow, "deny": deny})


def pattern_matches(pattern: str, name: str) -> bool:
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return pattern == name


def linear_scan(policy: Policy, source: str, destination: str, port: str) -> Decision:
    """Decide by checking every deny rule and then every allow rule in file order, without an index."""
    for kind, rules in (("deny", policy.deny), ("allow", policy.allow)):
        for index, rule in enumerate(rules):
            if (
                pattern_matches(rule.source, source)
                and pattern_matches(rule.to, destination)
                and ("*" in rule.ports or port in rule.ports)
            ):
                return Decision(allowed=kind == "allow", rule=describe_rule(kind, index, rule), kind=kind)
    return DEFAULT_DENY


def time_each(
    queries: list[Query],
    decide: Callable[[str, str, str], Decision],
    before: Callable[[], None] | None = None,
) -> list[float]:
    """Return the nanoseconds of each call decide(*query). before() runs untimed ahead of each call."""
    clock = time.perf_counter_ns
    durations = []
    for source, destination, port in queries:
        if before is not None:
            before()
        started = clock()
        decide(source, destination, port)
        durations.append(clock() - started)
    return durations


def time_total(queries: list[Query], decide: Callable[[str, str, str], Decision]) -> float:
    """Return the mean nanoseconds per call of decide over queries, timed as one loop."""
    started = time.perf_counter_ns()
    for source, destination, port in queries:
        decide(source, destination, port)
    return (time.perf_counter_ns() - started) / len(queries)


def timer_overhead(count: int) -> list[float]:
    clock = time.perf_counter_ns
    durations = []
    for _ in range(count):
        started = clock()
        durations.append(clock() - started)
    return durations


def check_agreement(engine: PolicyEngine, policy: Policy, queries: list[Query]) -> None:
    for query in queries:
        expected = linear_scan(policy, *query)
        for name, decision in (("decide", engine.decide(*query)), ("evaluate", engine.evaluate(*query))):
            if decision != expected:
                sys.exit(f"{name}{query} returned {decision}, but the linear scan returned {expected}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=1000, help="rules in the generated policy (default 1000)")
    parser.add_argument("--decisions", type=int, default=100_000, help="timed decisions per variant (default 100000)")
    parser.add_argument(
        "--distinct",
        type=int,
        default=5000,
        help="distinct (source, destination, port) queries that the timed decisions draw from (default 5000)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the policy and query generator (default 1)")
    arguments = parser.parse_args()

    if arguments.distinct > MAX_CACHED_DECISIONS:
        sys.exit(f"--distinct {arguments.distinct} is above the decision cache's limit of {MAX_CACHED_DECISIONS}")
    rng = random.Random(arguments.seed)
    components = component_names()
    policy = generate_policy(rng, arguments.rules, components)
    # A daemon decides for a limited set of connecting pairs. The pool also stays below the decision
    # cache's size limit, MAX_CACHED_DECISIONS, so that the cached variant measures cache hits.
    pool = [(rng.choice(components), rng.choice(components), rng.choice(PORTS)) for _ in range(arguments.distinct)]
    queries = [rng.choice(pool) for _ in range(arguments.decisions)]
    engine = PolicyEngine(policy)

    check_agreement(engine, policy, pool)
    outcomes = Counter(engine.decide(*query).kind for query in queries)

    # Fill the decision cache and the per-destination lists before timing.
    for query in queries:
        engine.decide(*query)
    compiled = engine._compiled
    variants: dict[str, dict[str, Any]] = {}
    variants["cached"] = {
        "per_decision_ns": harness.summarize(time_each(queries, engine.decide)),
        "mean_ns": time_total(queries, engine.decide),
    }
    variants["uncached"] = {
        "per_decision_ns": harness.summarize(time_each(queries, engine.evaluate)),
        "mean_ns": time_total(queries, engine.evaluate),
    }
    variants["cold"] = {
        "per_decision_ns": harness.summarize(time_each(queries, engine.evaluate, compiled.candidates.clear)),
    }
    # The cold path allocates enough objects to start garbage collections, whose full passes over
    # this process's heap make up the cold tail. This variant shows the figures without them.
    gc.disable()
    try:
        variants["cold_gc_disabled"] = {
            "per_decision_ns": harness.summarize(time_each(queries, engine.evaluate, compiled.candidates.clear)),
        }
    finally:
        gc.enable()
    scan_queries = queries[:LINEAR_SCAN_DECISIONS]

    def scan(source: str, destination: str, port: str) -> Decision:
        return linear_scan(policy, source, destination, port)

    variants["linear_scan"] = {
        "per_decision_ns": harness.summarize(time_each(scan_queries, scan)),
        "mean_ns": time_total(scan_queries, scan),
    }

    overhead = harness.summarize(timer_overhead(arguments.decisions))
    rows = []
    for name, figures in variants.items():
        per_decision = figures["per_decision_ns"]
        mean = f"{figures['mean_ns']:.0f}" if "mean_ns" in figures else "-"
        rows.append([name, str(per_decision["n"]), f"{per_decision['median']:.0f}", f"{per_decision['p99']:.0f}", mean])
    rows.append(["timer_overhead", str(overhead["n"]), f"{overhead['median']:.0f}", f"{overhead['p99']:.0f}", "-"])

    print(
        f"policy of {len(policy.allow)} allow and {len(policy.deny)} deny rules, {len(components)} components; "
        f"outcomes: {dict(outcomes)}"
    )
    harness.print_table(["variant", "decisions", "median ns", "p99 ns", "mean ns"], rows)
    path = harness.write_results("policy_decide", {
        "rules": {"allow": len(policy.allow), "deny": len(policy.deny)},
        "components": len(components),
        "ports_per_component": len(PORTS),
        "distinct_queries": len(set(pool)),
        "seed": arguments.seed,
        "outcomes": dict(outcomes),
        "variants": variants,
        "timer_overhead_ns": overhead,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
