"""Plot the rows of benchmarks/throughput.py: per model, tokens/s against batch
(log-log, one line per cache mode and tokens per step, the AR twin dashed) and
the speed-up over AR at the same batch.

    python benchmarks/plot_throughput.py benchmarks/results/h100_llada8b_modes.json \
        benchmarks/results/h100_dream7b_modes.json --out docs/throughput_modes.png

Several files may hold the same model (e.g. one run per mode); their rows are
pooled. Skipped rows (over the time budget) are left out. Rows written before
the cache modes existed (``tokens_per_step``, no ``mode``/``model``) read as
exact mode, named after their file.
"""

import argparse
import json
import os
from collections import defaultdict

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display on the benchmark machines
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"exact": "C0", "prefix": "C1", "dual": "C2"}
MARKERS = ["o", "s", "^", "D", "v", "P"]  # by k, in the order the k values sort


def load(paths: list[str]) -> dict[str, list[dict]]:
    """Measured rows by model, with the older rows' keys brought in line."""
    by_model = defaultdict(list)
    for path in paths:
        with open(path) as f:
            rows = json.load(f)
        stem = os.path.splitext(os.path.basename(path))[0]
        for r in rows:
            # Multi-block rows (blocks_in_flight > 1) are not a mode of these plots.
            if r.get("skipped") or "tok_per_s" not in r or r.get("blocks_in_flight", 1) > 1:
                continue
            r = dict(r)
            r.setdefault("k", r.get("tokens_per_step", 1))
            r.setdefault("mode", "ar" if r["engine"] == "ar" else "exact")
            by_model[r.get("model", stem)].append(r)
    return by_model


def series(rows: list[dict]) -> dict[tuple, dict[int, float]]:
    """(mode, k) -> {batch: tok/s}; a batch measured twice keeps its best."""
    out = defaultdict(dict)
    for r in rows:
        line = out[r["mode"], r["k"]]
        line[r["batch"]] = max(line.get(r["batch"], 0.0), r["tok_per_s"])
    return out


def plot(by_model: dict[str, list[dict]], path: str) -> None:
    fig, axes = plt.subplots(len(by_model), 2, figsize=(12, 4.5 * len(by_model)), squeeze=False)
    for (model, rows), (left, right) in zip(sorted(by_model.items()), axes):
        lines = series(rows)
        ar = lines.pop(("ar", 1), {})
        ks = sorted({k for _, k in lines})
        order = list(COLORS)  # exact, prefix, dual; anything else after them
        for (mode, k), points in sorted(lines.items(), key=lambda item: (
                order.index(item[0][0]) if item[0][0] in order else len(order), item[0])):
            style = dict(color=COLORS.get(mode, "C3"), marker=MARKERS[ks.index(k) % len(MARKERS)],
                         label=f"{mode} k={k}")
            batches = sorted(points)
            left.plot(batches, [points[b] for b in batches], "-", **style)
            shared = [b for b in batches if b in ar]  # speed-up only where AR ran too
            if shared:
                right.plot(shared, [points[b] / ar[b] for b in shared], "-", **style)
        if ar:
            batches = sorted(ar)
            left.plot(batches, [ar[b] for b in batches], "k--", marker="x", label="vLLM AR twin")
            right.axhline(1.0, color="k", ls="--", lw=1, label="AR")
        left.set(xscale="log", yscale="log", xlabel="batch (requests)", ylabel="tokens/s",
                 title=f"{model}: throughput")
        right.set(xscale="log", xlabel="batch (requests)", ylabel="tok/s / AR tok/s",
                  title=f"{model}: speed-up over AR at the same batch")
        all_batches = sorted({r["batch"] for r in rows})
        for ax in (left, right):
            # Ticks at the measured batches, not log decades: batches are few.
            ax.set_xticks(all_batches, [str(b) for b in all_batches])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(True, which="both", alpha=0.3)
        left.legend(fontsize=8, ncol=2)
        if not ar:
            right.text(0.5, 0.5, "no AR rows", ha="center", transform=right.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="files written by throughput.py --json")
    ap.add_argument("--out", default="throughput.png", help="the PNG to write")
    args = ap.parse_args()
    by_model = load(args.json)
    if not by_model:
        raise SystemExit("no measured rows in " + ", ".join(args.json))
    plot(by_model, args.out)


if __name__ == "__main__":
    main()
