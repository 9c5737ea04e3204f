#!/usr/bin/env python3
"""mmdit bench and the PyTorch eager peer, run alternately on the same machine, as one table.

Shared machines drift by 10-20% within minutes, so a comparison is only fair when both programs
run in the same period: each round runs `mmdit bench --json` and then `torch_bench.py --json`
for every thread count, and the table gives each round's medians and the ratio of the medians
over all rounds (PyTorch / mmdit-cpp: how many times faster ours is).

  /usr/bin/python3 tools/peers/side_by_side.py                     # 2 rounds on 2 threads, 1 on 1
  /usr/bin/python3 tools/peers/side_by_side.py --threads 2 --rounds 3 --workload policy-act
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = ["policy-train", "policy-act", "policy-act-b64", "incontext-train"]


def run_json(command):
    """One JSON object per workload, keyed by workload; stderr (progress, re-runs) passes through."""
    run = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if run.returncode != 0:
        sys.exit(f"side_by_side: {' '.join(command)} exited with {run.returncode}")
    output = run.stdout
    results = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return {r["workload"]: r for r in results}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mmdit",
                        default=os.path.normpath(os.path.join(HERE, "..", "..", "build", "mmdit")),
                        help="the mmdit binary (default: build/mmdit)")
    parser.add_argument("--threads", type=int, action="append",
                        help="repeatable; default 2 and 1")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per thread count (default: 2 on 2 threads, 1 on 1)")
    parser.add_argument("--workload", action="append", choices=WORKLOADS,
                        help="repeatable; default all four")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if not os.access(args.mmdit, os.X_OK):
        sys.exit(f"side_by_side: {args.mmdit} is not an executable; build first or pass --mmdit")
    workloads = args.workload or WORKLOADS
    selection = [arg for w in workloads for arg in ("--workload", w)]
    reps = ["--reps", str(args.reps)]

    rows = []
    for threads in args.threads or [2, 1]:
        rounds = args.rounds or (2 if threads > 1 else 1)
        ours, peer = {w: [] for w in workloads}, {w: [] for w in workloads}
        for round_index in range(rounds):
            print(f"side_by_side: {threads} thread(s), round {round_index + 1} of {rounds}",
                  file=sys.stderr, flush=True)
            mine = run_json([args.mmdit, "bench", "--json", "--threads", str(threads)] +
                            selection + reps)
            theirs = run_json([sys.executable, os.path.join(HERE, "torch_bench.py"), "--json",
                               "--threads", str(threads)] + selection + reps)
            for w in workloads:
                ours[w].append(mine[w])
                peer[w].append(theirs[w])
        for w in workloads:
            ratio = (statistics.median(r["median_ms"] for r in peer[w]) /
                     statistics.median(r["median_ms"] for r in ours[w]))
            rows.append((w, threads, ours[w], peer[w], ratio))

    first = rows[0]
    print(f"mmdit-cpp (OpenBLAS core {first[2][0].get('openblas_core', '?')}) and PyTorch "
          f"{first[3][0]['torch_version']} eager (OpenBLAS core {first[3][0]['openblas_core']}), "
          f"float32, medians of {args.reps} reps per round, rounds run alternately\n")
    print("| workload | threads | mmdit-cpp ms | PyTorch ms | PyTorch / mmdit-cpp | "
          "peak RSS MB (ours, PyTorch) |")
    print("|---|---|---|---|---|---|")
    def medians(results):
        return ", ".join(f"{r['median_ms']:.1f}" for r in results)

    def peak_rss(results):
        return max(r["peak_rss_mb"] for r in results)

    for w, threads, ours, peer, ratio in rows:
        print(f"| {w} | {threads} | {medians(ours)} | {medians(peer)} | {ratio:.2f}x | "
              f"{peak_rss(ours):.0f}, {peak_rss(peer):.0f} |")


if __name__ == "__main__":
    main()
