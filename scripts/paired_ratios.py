#!/usr/bin/env python3
"""Each server against a baseline, run by run, from a `multiecho compare` report.

compare interleaves its runs (each round gives every server one run at a point), so the
runs of one round were made within seconds of each other. Dividing a server's figure by
the baseline's figure of the same round cancels most of the machine's drift between rounds;
the median of those ratios is steadier than the ratio of two medians.

With --max-steal PERCENT, a pair is left out when either run's window had more than PERCENT
of the machine's CPU time stolen by the host for other guests (compare's `steal_percent`;
a run that has no such figure is kept); the tables then say how many pairs were left out.

usage: scripts/paired_ratios.py REPORT.json [BASELINE] [--max-steal PERCENT]
       (BASELINE: default c-reference)
"""
import argparse
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


def stolen(figures, max_steal):
    """Whether a run's window had more CPU time stolen than `max_steal` percent."""
    steal = figures.get("steal_percent")
    return max_steal is not None and steal is not None and steal > max_steal


def paired(runs, baseline, key, max_steal=None):
    """Per-round ratios of `key`, for the rounds where both runs produced it, and how many
    rounds were left out for stolen time."""
    ratios, dropped = [], 0
    for mine, theirs in zip(runs, baseline):
        if mine and theirs and mine.get(key) and theirs.get(key):
            if stolen(mine, max_steal) or stolen(theirs, max_steal):
                dropped += 1
                continue
            ratios.append(mine[key] / theirs[key])
    return ratios, dropped


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("report")
    parser.add_argument("baseline", nargs="?", default="c-reference")
    parser.add_argument("--max-steal", type=float, metavar="PERCENT")
    args = parser.parse_args()
    report = json.load(open(args.report))
    baseline_name = args.baseline
    servers = {s["name"]: runs_by_point(s) for s in report["servers"] if s["points"]}
    if baseline_name not in servers:
        sys.exit(f"no server named {baseline_name} in {args.report}: {', '.join(servers)}")
    baseline = servers.pop(baseline_name)
    for label, key in FIGURES:
        print(f"\n{label}, ÷ {baseline_name} in the same round: median (range) over the rounds\n")
        points = sorted(baseline)
        heads = [f"{c} conn{'' if c == 1 else 's'}, {s} B" for c, s in points]
        print("| server | " + " | ".join(heads) + " |")
        print("|---|" + "---:|" * len(points))
        left_out = 0
        for name, runs in servers.items():
            cells = []
            for point in points:
                ratios, dropped = paired(runs.get(point, []), baseline[point], key, args.max_steal)
                left_out += dropped
                cells.append(
                    f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"
                    if ratios
                    else "–"
                )
            print(f"| {name} | " + " | ".join(cells) + " |")
        if args.max_steal is not None:
            print(f"\n{left_out} pairs left out: more than {args.max_steal:g}% stolen in a window")


if __name__ == "__main__":
    main()
