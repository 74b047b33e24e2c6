"""Plot benchmarks/results/h100_qwen_image.json: seconds per 1024x1024 image
(50 steps, true CFG) for diffusers and vLLM-Omni at batch 1 and 4, and where
our batch-1 engine step spends its device time (the profiler's kernel classes).

    python benchmarks/plot_images.py benchmarks/results/h100_qwen_image.json \
        --out docs/qwen_image_h100.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    data = json.load(open(args.result))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    engines = ["diffusers", "vllm_omni"]
    batches = sorted({r["batch"] for r in data["runs"]})
    width = 0.38
    for i, engine in enumerate(engines):
        rows = {r["batch"]: r for r in data["runs"] if r["engine"] == engine}
        xs = [b + (i - 0.5) * width for b in range(len(batches))]
        ys = [rows[b]["s_per_image"] for b in batches]
        bars = left.bar(xs, ys, width, label=engine, color=f"C{i}")
        left.bar_label(bars, [f"{y:.2f} s" for y in ys], fontsize=8)
    left.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    left.set_ylabel("seconds per image (lower is better)")
    left.set_title("Qwen-Image shape, 1024x1024, 50 steps, true CFG 4, bf16")
    left.legend(loc="lower right")
    split = data["profile_batch1"]["kernel_seconds"]
    labels = sorted(split, key=lambda k: -split[k])
    right.barh(labels, [split[k] for k in labels], color="C2")
    for y, k in enumerate(labels):
        right.text(split[k], y, f" {split[k]:.2f} s", va="center", fontsize=8)
    right.invert_yaxis()
    right.set_xlim(0, max(split.values()) * 1.2)
    right.set_xlabel("device seconds in one batch-1 engine step")
    step = data["profile_batch1"]["engine_step_s"]
    right.set_title(f"ours, batch 1: device time by kernel class\n"
                    f"(one engine step, {step:.1f} s under the profiler)", fontsize=10)
    fig.suptitle(data["device"].split(";")[0], fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
