"""Statistics over the load generator's per-request records: windows, percentiles, timelines, downtime."""

import bisect
import gzip
import math
from collections import Counter
from pathlib import Path
from typing import Any

from loadgen import OK, OUTCOMES, read_records


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the percentile of sorted values, interpolating between the two nearest ranks.

    This is statistics.quantiles(method="inclusive"): the minimum is fraction 0 and the maximum
    fraction 1, so p99 of 1000 values lies between the 990th and the 991st smallest.
    """
    if not sorted_values:
        return math.nan
    position = fraction * (len(sorted_values) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    weight = position - lower
    return sorted_values[lower] * (1 - weight) + sorted_values[upper] * weight


class Records:
    """One load run's requests, ordered by completion time (time.monotonic() seconds).

    Windows select requests by completion, start plus latency, so a request that was in flight
    when a swap began and failed because of it counts in the swap, where its failure was seen.
    """

    def __init__(self, path: Path):
        self.header, starts, latencies, outcomes = read_records(str(path))
        ends = [start + latency for start, latency in zip(starts, latencies)]
        order = sorted(range(len(ends)), key=ends.__getitem__)
        self.ends = [ends[index] for index in order]
        self.starts = [starts[index] for index in order]
        self.latencies = [latencies[index] for index in order]
        self.outcomes = [outcomes[index] for index in order]

    def __len__(self) -> int:
        return len(self.ends)

    def indexes(self, begin: float, end: float) -> range:
        """Return the indexes of the requests that completed in [begin, end)."""
        return range(bisect.bisect_left(self.ends, begin), bisect.bisect_left(self.ends, end))

    def summarize(self, intervals: list[tuple[float, float]]) -> dict[str, Any]:
        """Count and summarize the requests that completed in any of the intervals."""
        latencies = []
        outcomes: Counter[int] = Counter()
        duration = 0.0
        for begin, end in intervals:
            duration += max(0.0, end - begin)
            for index in self.indexes(begin, end):
                latencies.append(self.latencies[index])
                outcomes[self.outcomes[index]] += 1
        return summarize_latencies(latencies, outcomes, duration)

    def write_csv(self, path: Path, origin: float) -> None:
        """Write every request as gzip-compressed CSV: start (s after origin), latency (ms), outcome."""
        with gzip.open(path, "wt", compresslevel=6) as output:
            output.write("start_s,latency_ms,outcome\n")
            for start, latency, outcome in zip(self.starts, self.latencies, self.outcomes):
                output.write(f"{start - origin:.6f},{latency * 1000:.3f},{OUTCOMES[outcome]}\n")

    def timeline(self, begin: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """Return per-step counts and latency percentiles from begin to end, by completion time."""
        rows = []
        position = begin
        while position < end:
            indexes = self.indexes(position, position + step)
            latencies = sorted(self.latencies[index] for index in indexes)
            failed = sum(1 for index in indexes if self.outcomes[index] != OK)
            rows.append({
                "t_s": round(position - begin, 3),
                "requests": len(indexes),
                "failed": failed,
                "p50_ms": _ms(percentile(latencies, 0.50)),
                "p99_ms": _ms(percentile(latencies, 0.99)),
            })
            position += step
        return rows

    def outage(self, begin: float, end: float) -> dict[str, Any]:
        """Measure the outage among requests that completed in [begin, end).

        The outage runs from the first failed request's completion to the completion of the first
        successful request after the last failed one. Without failures it is 0.
        """
        completions = [(self.ends[index], self.outcomes[index] != OK) for index in self.indexes(begin, end)]
        failures = [moment for moment, failed in completions if failed]
        if not failures:
            return {"failed": 0, "downtime_s": 0.0, "first_failure": None, "recovered": None}
        last_failure = failures[-1]
        recovered = next((moment for moment, failed in completions if not failed and moment > last_failure), None)
        return {
            "failed": len(failures),
            "downtime_s": (recovered - failures[0]) if recovered is not None else None,
            "first_failure": failures[0],
            "recovered": recovered,
        }


def summarize_latencies(latencies: list[float], outcomes: Counter, duration: float) -> dict[str, Any]:
    """Return requests, failures by kind, throughput and latency percentiles (ms) of a set of requests."""
    latencies.sort()
    total = sum(outcomes.values())
    failed = total - outcomes.get(OK, 0)
    return {
        "requests": total,
        "failed": failed,
        "failures_by_kind": {OUTCOMES[code]: count for code, count in sorted(outcomes.items()) if code != OK},
        "seconds": round(duration, 3),
        "requests_per_second": round(total / duration, 1) if duration > 0 else None,
        "p50_ms": _ms(percentile(latencies, 0.50)),
        "p90_ms": _ms(percentile(latencies, 0.90)),
        "p99_ms": _ms(percentile(latencies, 0.99)),
        "p999_ms": _ms(percentile(latencies, 0.999)),
        "max_ms": _ms(latencies[-1]) if latencies else None,
    }


def _ms(seconds: float) -> float | None:
    if math.isnan(seconds):
        return None
    return round(seconds * 1000, 3)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)
