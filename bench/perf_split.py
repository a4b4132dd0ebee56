"""Where two processes' CPU time went, side by side, from `perf record`
files: the networks' layer kernels (MKL matrix products, oneDNN's JIT
convolutions, flash attention, norms, activations), which swiftbrush and
the PyTorch reference call with the same shapes in the same libtorch, and
everything else (elementwise ops, copies, the OpenMP runtime, page faults,
the Python interpreter). What bounds the speed-up on a CPU: README,
"Performance against the authors' stack".

  perf record -F 499 -o ours.data target/release/swiftbrush bench vsd-step --config C --teacher T --steps 3
  perf record -F 499 -o ref.data .venv/bin/python bench/reference_vsd_step.py --config C --teacher T \\
      --steps 3 --student-fp32
  python3 bench/perf_split.py ours.data ref.data

Seconds are CPU seconds of the whole process (both threads; loading the
models too), from perf's cpu-clock event count.
"""

import collections
import re
import subprocess
import sys

LAYER_KERNELS = (
    "matrix products (MKL)",
    "convolutions (oneDNN JIT)",
    "attention (flash)",
    "norms",
    "activations",
)


def report(path, sort):
    out = subprocess.run(
        ["perf", "report", "-i", path, "--no-children", "--sort", sort, "--stdio", "-g", "none",
         "--percent-limit", "0"],
        capture_output=True, text=True, check=True,
    ).stdout
    return out.splitlines()


def cpu_seconds(path):
    for line in report(path, "dso"):
        m = re.match(r"# Event count \(approx\.\): (\d+)", line)
        if m:
            return int(m.group(1)) / 1e9  # cpu-clock counts nanoseconds
    raise SystemExit(f"{path}: no event count (not a cpu-clock perf record?)")


def libtorch_category(sym):
    if "mkl_blas" in sym or "gemm" in sym:
        return "matrix products (MKL)"
    if "dnnl" in sym or "jit_" in sym or "brgemm" in sym:
        return "convolutions (oneDNN JIT)"
    if "flash_attention" in sym:
        return "attention (flash)"
    if re.search(r"GroupNorm|LayerNorm|RowwiseMoments|group_norm|layer_norm", sym):
        return "norms"
    if re.search(r"silu|gelu|Sleef|Gelu|Silu", sym):
        return "activations"
    if "copy_kernel" in sym or "copy_" in sym:
        return "copies"
    return "other libtorch (elementwise ops, dispatch)"


def split(path):
    """Category -> percent of the process's samples."""
    c = collections.Counter()
    # oneDNN's generated convolution code has no symbols: perf files it
    # under a [JIT] pseudo-library, counted here whole.
    for line in report(path, "dso"):
        m = re.match(r"\s+([\d.]+)%\s+(.+?)\s*$", line)
        if not m:
            continue
        pct, dso = float(m.group(1)), m.group(2)
        if dso.startswith("[JIT]"):
            c["convolutions (oneDNN JIT)"] += pct
        elif "gomp" in dso or "libiomp" in dso:
            c["OpenMP runtime (barriers, spinning)"] += pct
        elif dso.startswith("[kernel"):
            c["OS kernel (page faults, ...)"] += pct
        elif "python" in dso:
            c["Python interpreter"] += pct
        elif not dso.startswith("libtorch_cpu"):
            c["other libraries (libc, libm, ...)"] += pct
    for line in report(path, "dso,sym"):
        m = re.match(r"\s+([\d.]+)%\s+libtorch_cpu\.so\s+\[.\]\s+(.*)", line)
        if m:
            c[libtorch_category(m.group(2))] += float(m.group(1))
    return c


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    paths = sys.argv[1:]
    shares = [split(p) for p in paths]
    seconds = [cpu_seconds(p) for p in paths]
    keys = sorted(set().union(*shares), key=lambda k: (k not in LAYER_KERNELS, -sum(s[k] for s in shares)))
    print(f"{'CPU seconds':44}{paths[0]:>16}{paths[1]:>16}")
    for k in keys:
        print(f"{k:44}" + "".join(f"{s[k] * t / 100:16.1f}" for s, t in zip(shares, seconds)))
    layer = [sum(s[k] for k in LAYER_KERNELS) * t / 100 for s, t in zip(shares, seconds)]
    print(f"{'layer kernels together':44}" + "".join(f"{x:16.1f}" for x in layer))
    print(f"{'everything else':44}" + "".join(f"{t - x:16.1f}" for x, t in zip(layer, seconds)))
    print(f"{'whole process':44}" + "".join(f"{t:16.1f}" for t in seconds))


if __name__ == "__main__":
    main()
