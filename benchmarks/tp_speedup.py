"""Merge throughput rows of several runs and print the tensor-parallel speedups.

    python benchmarks/tp_speedup.py run/tp1_diffusion.json run/tp1_ar.json run/tp2.json \
        --json benchmarks/results/h100x2_tp.json

For every (engine, mode, k, batch) measured at TP=1 and TP=N: TP=N tok/s over
TP=1 tok/s, and for the diffusion rows that speedup over the AR twin's at the
same batch ("of AR's speedup": 1.0 means TP helps denoising exactly as much as
it helps plain vLLM decoding).
"""

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="+", help="JSON files of throughput.py rows")
    ap.add_argument("--json", help="write all measured rows here, with speedups")
    args = ap.parse_args()
    rows = []
    for path in args.rows:
        with open(path) as f:
            rows += [r for r in json.load(f) if not r.get("skipped")]
    by_key = {(r["engine"], r["mode"], r["k"], r["batch"], r.get("tp", 1)): r for r in rows}
    for (engine, mode, k, batch, tp), r in by_key.items():
        base = by_key.get((engine, mode, k, batch, 1))
        if tp > 1 and base:
            r["speedup_vs_tp1"] = round(r["tok_per_s"] / base["tok_per_s"], 3)
    for (engine, mode, k, batch, tp), r in by_key.items():
        ar = by_key.get(("ar", "ar", 1, batch, tp))
        if engine == "diffusion" and "speedup_vs_tp1" in r and ar and "speedup_vs_tp1" in ar:
            r["of_ar_speedup"] = round(r["speedup_vs_tp1"] / ar["speedup_vs_tp1"], 3)
    print(f"{'engine':<10}{'mode':<7}{'k':>3}{'batch':>6}{'tp':>4}{'tok/s':>10}"
          f"{'x TP=1':>8}{'of AR x':>9}")
    for key in sorted(by_key, key=lambda t: (t[0] != "diffusion", t[1], t[2], t[3], t[4])):
        r = by_key[key]
        print(f"{key[0]:<10}{key[1]:<7}{key[2]:>3}{key[3]:>6}{key[4]:>4}{r['tok_per_s']:>10}"
              f"{r.get('speedup_vs_tp1', '-'):>8}{r.get('of_ar_speedup', '-'):>9}")
    if args.json:
        with open(args.json, "w") as f:
            for r in sorted(by_key.values(), key=lambda r: (r["engine"], r["mode"], r["k"],
                                                             r["batch"], r.get("tp", 1))):
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
