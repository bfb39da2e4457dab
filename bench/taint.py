"""Taint check speed: the run's corpus (one C-level search) against a per-content Python scan, same run.

    python3 bench/taint.py [--mb 8] [--values 200]

Prints microseconds per argument value for the tracker and for the baseline that loops over every content
item in Python (what a naive tracker does), and their ratio.
"""

from __future__ import annotations

import argparse
import random
import time

from stitchwork.security.taint import Label, ProvenanceTracker, normalise


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=8.0)
    parser.add_argument("--values", type=int, default=200)
    opts = parser.parse_args()
    rng = random.Random(7)
    words = [f"w{rng.randrange(100_000)}" for _ in range(5_000)]
    items: list[str] = []
    size = 0
    while size < opts.mb * 1_000_000:
        text = " ".join(rng.choice(words) for _ in range(400)) + f" contact{len(items)}@mail.example"
        items.append(text)
        size += len(text)
    tracker = ProvenanceTracker()
    tracker.add("the user's task", Label("user", True))
    for i, text in enumerate(items):
        tracker.add(text, Label(f"tool:t{i % 10}", False))
    values = [f"contact{rng.randrange(len(items))}@mail.example" for _ in range(opts.values // 2)]
    values += [f"nobody{i}@else.example" for i in range(opts.values // 2)]
    tracker.check({"warm": "up value"})
    started = time.perf_counter()
    for value in values:
        tracker.check({"to": value})
    ours = (time.perf_counter() - started) / len(values)
    normalised = [normalise(t) for t in items]
    started = time.perf_counter()
    for value in values:
        form = normalise(value)
        _ = {i % 10 for i, text in enumerate(normalised) if form in text}
    naive = (time.perf_counter() - started) / len(values)
    print(f"corpus {size / 1e6:.1f} MB in {len(items)} items, {len(values)} values")
    print(f"tracker.check   {ours * 1e6:10.1f} us/value")
    print(f"per-item scan   {naive * 1e6:10.1f} us/value")
    print(f"ratio (scan / tracker): {naive / ours:.2f}")


if __name__ == "__main__":
    main()
