"""Per-step time of README's "Distributed" example on CPU (a coordinator and
two `swiftbrush worker` processes) against `swiftbrush train --workers 2`
(both workers in one process), on the tiny fixture teacher and
configs/tiny.yaml. Issue 29: each worker process used to size libtorch's
thread pools to every core, and the two processes starved each other.

  python3 bench/distributed_threads.py --bin target/debug/swiftbrush --rounds 3
  python3 bench/distributed_threads.py --bin OLD_BINARY --worker-args=    # before

A step's time is read from the workers' JSON log lines ("step" events):
(time of the last step - time of step --skip) / the steps between, so
model loading and the first steps' warm-up do not count. The rounds
alternate the two forms; medians are printed. The environment is cleared
except PATH and what --env adds (no OMP_NUM_THREADS unless given).
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

TOKEN = "bench-distributed-threads-0123456789"


def job_yaml(teacher, captions, steps, run_dir):
    base = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    text = base.read_text()
    text = text.replace("model:\n", f"model:\n  teacher: {teacher}\n", 1)
    text = text.replace("max_steps: 4", f"max_steps: {steps}", 1)
    text = text.replace("min_size: 1", "min_size: 2", 1)
    text = text.replace("run_dir: runs/tiny", f"run_dir: {run_dir}", 1)
    text = text.replace("every_steps: 2", f"every_steps: {steps}", 1)
    return text + f"data:\n  captions: [{captions}]\n"


def step_times(log_text):
    """step -> the earliest time any worker logged it (seconds)."""
    times = {}
    for line in log_text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("message") != "step":
            continue
        t = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        step = int(event["step"])
        times[step] = min(times.get(step, t), t)
    return times


def per_step(times, skip):
    last = max(times)
    return (times[last] - times[skip]) / (last - skip)


def env_for(extra):
    env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": "info"}
    for kv in extra:
        k, _, v = kv.partition("=")
        env[k] = v
    return env


def run_processes(args, dir, round_no):
    run_dir = dir / f"dist-{round_no}"
    (dir / "job.yaml").write_text(job_yaml(args.teacher, dir / "captions.txt", args.steps, run_dir))
    port = random.randint(20000, 40000)
    env = env_for(args.env)
    env["SWIFTBRUSH_TOKEN"] = TOKEN
    coord_log = open(dir / f"coordinator-{round_no}.log", "w")
    coordinator = subprocess.Popen(
        [args.bin, "coordinator", "--store", str(run_dir), "--config", str(dir / "job.yaml"),
         "--listen", f"127.0.0.1:{port}"],
        env=env, stdout=coord_log, stderr=subprocess.STDOUT)
    try:
        logs = []
        workers = []
        started = time.monotonic()
        for i in range(2):
            log = dir / f"worker-{round_no}-{i}.log"
            logs.append(log)
            workers.append(subprocess.Popen(
                [args.bin, "--log-format", "json", "worker", "--coordinator",
                 f"http://127.0.0.1:{port}", "--device", "cpu", "--host", f"w{i}"]
                + args.worker_args.split(),
                env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w")))
        for w in workers:
            if w.wait() != 0:
                sys.exit(f"a worker failed; see {dir}")
        wall = time.monotonic() - started
    finally:
        coordinator.terminate()
        coordinator.wait()
    text = "".join(log.read_text() for log in logs)
    threads = sorted({line.split("threads: ", 1)[1].split('"')[0]
                      for line in text.splitlines() if "threads: " in line})
    return per_step(step_times(text), args.skip), wall, threads


def run_local(args, dir, round_no):
    run_dir = dir / f"local-{round_no}"
    (dir / "job.yaml").write_text(job_yaml(args.teacher, dir / "captions.txt", args.steps, run_dir))
    started = time.monotonic()
    out = subprocess.run(
        [args.bin, "--log-format", "json", "train", "--config", str(dir / "job.yaml"),
         "--workers", "2"],
        env=env_for(args.env), capture_output=True, text=True)
    wall = time.monotonic() - started
    if out.returncode != 0:
        sys.exit(f"train failed:\n{out.stderr}")
    return per_step(step_times(out.stderr), args.skip), wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default="target/debug/swiftbrush")
    parser.add_argument("--teacher", default=os.environ.get(
        "SWIFTBRUSH_FIXTURES", "target/fixtures/current") + "/pipelines/sd1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=2, help="steps not counted (warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker-args", default="--local-workers 2",
                        help="extra `swiftbrush worker` flags (empty: none)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    args.bin = str(Path(args.bin).resolve())
    args.teacher = str(Path(args.teacher).resolve())
    with tempfile.TemporaryDirectory() as d:
        dir = Path(d)
        (dir / "captions.txt").write_text(
            "".join(f"a photo of thing number {i}\n" for i in range(8)))
        procs, local = [], []
        for r in range(args.rounds):
            p, pwall, threads = run_processes(args, dir, r)
            l, lwall = run_local(args, dir, r)
            procs.append(p)
            local.append(l)
            print(f"round {r}: two processes {p:.3f} s/step (wall {pwall:.1f} s; threads: "
                  f"{'; '.join(threads) or 'not said'}), train --workers 2 {l:.3f} s/step "
                  f"(wall {lwall:.1f} s), ratio {p / l:.2f}x", flush=True)
        p, l = statistics.median(procs), statistics.median(local)
        print(f"median: two processes {p:.3f} s/step, train --workers 2 {l:.3f} s/step, "
              f"ratio {p / l:.2f}x ({args.steps} steps, steps {args.skip}..{args.steps} timed, "
              f"{args.rounds} rounds, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
