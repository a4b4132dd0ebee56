"""Builds every test fixture: the tiny reference pipelines and the golden
tensors that Rust tests compare against.

Output goes to ROOT/<hash>/, where <hash> covers the reference scripts and
the pinned package lists, and ROOT/current points at it; an unchanged hash
does nothing, so `make test` is quick once built. Each golden_*.py module in
this folder has build(fixtures_dir, pipelines) and writes its own files.
"""

import argparse
import glob
import hashlib
import importlib
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def content_hash():
    h = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(HERE, "*.py")))
    files += [os.path.join(HERE, "requirements.txt"), os.path.join(HERE, "constraints.txt")]
    files += [os.path.join(REPO, "requirements-torch.txt")]
    # Real-architecture configs the golden scripts read.
    files += sorted(glob.glob(os.path.join(REPO, "worker", "src", "models", "configs", "*.json")))
    for f in files:
        h.update(os.path.basename(f).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    args = ap.parse_args()
    root = os.path.abspath(args.root)
    digest = content_hash()
    out = os.path.join(root, digest)
    current = os.path.join(root, "current")
    if os.path.exists(os.path.join(out, "DONE")):
        relink(current, digest)
        print(f"fixtures up to date: {out}")
        return
    started = time.time()
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    sys.path.insert(0, HERE)
    # Fixed threads and deterministic kernels: goldens must not depend on
    # the machine that built them.
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import pipelines

    paths = pipelines.build(tmp)
    # SDXL has its own fixture and goldens (pipelines_xl.py, golden_*_xl.py),
    # outside `paths`: the SD goldens iterate over `paths`.
    import pipelines_xl

    pipelines_xl.build(tmp)
    for path in sorted(glob.glob(os.path.join(HERE, "golden_*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        t0 = time.time()
        importlib.import_module(name).build(tmp, paths)
        print(f"  {name}: {time.time() - t0:.1f}s")
    with open(os.path.join(tmp, "DONE"), "w") as f:
        f.write(digest + "\n")
    shutil.rmtree(out, ignore_errors=True)
    # Pipelines record absolute paths nowhere, so the folder can move.
    os.rename(tmp, out)
    relink(current, digest)
    for old in os.listdir(root):
        if old not in (digest, "current") and not old.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    print(f"fixtures built in {time.time() - started:.1f}s: {out}")


def relink(current, digest):
    tmp_link = current + ".tmp"
    if os.path.lexists(tmp_link):
        os.remove(tmp_link)
    os.symlink(digest, tmp_link)
    os.replace(tmp_link, current)


if __name__ == "__main__":
    main()
