"""swiftbrush's training step beside the peer users would pick instead, in
one invocation on one machine: `swiftbrush bench vsd-step` and
bench/reference_vsd_step.py (PyTorch + diffusers + peft, SPEC steps 1-7),
alternating, on the same teacher, config and device, each timed the same
way (one warm-up, N timed steps, median). Prints both, their ratio, and
with --json the raw reports.

  .venv/bin/python bench/vs_reference.py --config configs/toy.yaml \\
      --teacher assets/toy-teacher [--rounds 3] [--steps 5] [--device cpu]

The ratio is reference median / swiftbrush median over the rounds'
medians (> 1: swiftbrush is faster). Both compute the same step: the
reference's student runs under the config's autocast when the config's
`precision.student_autocast` is true (as the authors run it), and in fp32
(--student-fp32) when it is false, the default.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# What worker/src/torch/host_memory.rs sets with mallopt, as glibc's environment
# variables (MMAP_THRESHOLD, TRIM_THRESHOLD there).
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def run_json(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed:\n{p.stderr[-2000:]}")
    try:
        return json.loads(p.stdout)  # bench vsd-step: one pretty-printed object
    except json.JSONDecodeError:
        return json.loads(p.stdout.strip().splitlines()[-1])  # a line after logs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(REPO, "target", "release", "swiftbrush"))
    ap.add_argument("--config", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two")
    ap.add_argument("--micro-batch", type=int)
    ap.add_argument("--tuned-reference", action="store_true",
                    help="also run the reference under the glibc malloc settings swiftbrush makes for "
                    "itself (worker/src/torch/host_memory.rs), as a third alternation: how much of the "
                    "ratio is the allocator")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    common = ["--config", args.config, "--teacher", args.teacher, "--device", args.device,
              "--steps", str(args.steps)]
    if args.micro_batch:
        common += ["--micro-batch", str(args.micro_batch)]
    import yaml

    with open(args.config) as f:
        precision = (yaml.safe_load(f) or {}).get("precision") or {}
    student_fp32 = [] if precision.get("student_autocast", False) else ["--student-fp32"]
    reference = [sys.executable, os.path.join(HERE, "reference_vsd_step.py"), *common, *student_fp32, "--json"]
    ours, theirs, tuned = [], [], []
    for _ in range(args.rounds):
        ours.append(run_json([args.bin, "bench", "vsd-step", *common, "--json"]))
        theirs.append(run_json(reference))
        if args.tuned_reference:
            tuned.append(run_json(reference, env={**os.environ, **TUNED_MALLOC}))
    o = statistics.median(r["median_step_s"] for r in ours)
    t = statistics.median(r["median_step_s"] for r in theirs)

    def mem(r):
        return r.get("peak_gpu_mib") or r.get("peak_host_mib")

    summary = {
        "config": args.config,
        "teacher": args.teacher,
        "device": args.device,
        "images_per_step": ours[0]["images_per_step"],
        "rounds": args.rounds,
        "steps": args.steps,
        "swiftbrush_median_step_s": o,
        "reference_median_step_s": t,
        "ratio": t / o,
        "swiftbrush_rounds_s": [r["median_step_s"] for r in ours],
        "reference_rounds_s": [r["median_step_s"] for r in theirs],
        "swiftbrush_peak_mib": max(mem(r) for r in ours),
        "reference_peak_mib": max(mem(r) for r in theirs),
        "swiftbrush_host_malloc": ours[0].get("host_malloc"),
        "swiftbrush": ours,
        "reference": theirs,
    }
    if tuned:
        tt = statistics.median(r["median_step_s"] for r in tuned)
        summary.update({
            "tuned_reference_median_step_s": tt,
            "tuned_ratio": tt / o,
            "tuned_reference_rounds_s": [r["median_step_s"] for r in tuned],
            "tuned_reference": tuned,
        })
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    kind = "GPU" if ours[0].get("peak_gpu_mib") else "host"
    print(f"{'':26}{'swiftbrush':>12}{'reference':>12}")
    print(f"{'median step (s)':26}{o:12.4f}{t:12.4f}")
    print(f"{'images/s':26}{summary['images_per_step'] / o:12.2f}{summary['images_per_step'] / t:12.2f}")
    print(f"{'peak ' + kind + ' memory (MiB)':26}{summary['swiftbrush_peak_mib']:12.0f}"
          f"{summary['reference_peak_mib']:12.0f}")
    print(f"{'rounds (s)':26}{' '.join(f'{x:.3f}' for x in summary['swiftbrush_rounds_s'])} | "
          f"{' '.join(f'{x:.3f}' for x in summary['reference_rounds_s'])}")
    print(f"ratio (reference / swiftbrush): {t / o:.2f}x")
    print(f"swiftbrush host memory: {summary['swiftbrush_host_malloc']}")
    if tuned:
        print(f"reference with the same malloc settings: {summary['tuned_reference_median_step_s']:.4f} s "
              f"(rounds {' '.join(f'{x:.3f}' for x in summary['tuned_reference_rounds_s'])}); "
              f"ratio {summary['tuned_ratio']:.2f}x")


if __name__ == "__main__":
    main()
