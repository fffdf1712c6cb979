#!/usr/bin/env python3
"""Each server against a baseline, run by run, from a `multiecho compare` report.

compare interleaves its runs (each round gives every server one run at a point), so the
runs of one round were made within seconds of each other. Dividing a server's figure by
the baseline's figure of the same round cancels most of the machine's drift between rounds;
the median of those ratios is steadier than the ratio of two medians.

usage: scripts/paired_ratios.py REPORT.json [BASELINE]   (BASELINE: default c-reference)
"""
import json
import statistics
import sys

FIGURES = [
    ("server CPU per round trip", "server_cpu_us_per_round_trip"),
    ("round trips per second", "round_trips_per_sec"),
]


def runs_by_point(server):
    """{(conns, size): [figures or None per round]}"""
    return {
        (point["conns"], point["size"]): [run["figures"] for run in point["runs"]]
        for point in server["points"]
    }


def paired(runs, baseline, key):
    """Per-round ratios of `key`, for the rounds where both runs produced it."""
    ratios = []
    for mine, theirs in zip(runs, baseline):
        if mine and theirs and mine.get(key) and theirs.get(key):
            ratios.append(mine[key] / theirs[key])
    return ratios


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.strip().splitlines()[-1])
    report = json.load(open(sys.argv[1]))
    baseline_name = sys.argv[2] if len(sys.argv) == 3 else "c-reference"
    servers = {s["name"]: runs_by_point(s) for s in report["servers"] if s["points"]}
    if baseline_name not in servers:
        sys.exit(f"no server named {baseline_name} in {sys.argv[1]}: {', '.join(servers)}")
    baseline = servers.pop(baseline_name)
    for label, key in FIGURES:
        print(f"\n{label}, ÷ {baseline_name} in the same round: median (range) over the rounds\n")
        points = sorted(baseline)
        heads = [f"{c} conn{'' if c == 1 else 's'}, {s} B" for c, s in points]
        print("| server | " + " | ".join(heads) + " |")
        print("|---|" + "---:|" * len(points))
        for name, runs in servers.items():
            cells = []
            for point in points:
                ratios = paired(runs.get(point, []), baseline[point], key)
                cells.append(
                    f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"
                    if ratios
                    else "–"
                )
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
