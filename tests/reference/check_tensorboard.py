"""Reads a run's TensorBoard event files with TensorBoard's own loader, for
the Rust trainer tests (run by them; not a fixture builder, so it has no
build()). Prints one JSON object:
  {"files": [{"name": ..., "version": ..., "scalars": {tag: [[step, value], ...]}}]}

  check_tensorboard.py RUN_DIR

The loader checks every record's length and data CRCs and fails on a bad
one, as TensorBoard does.
"""

import glob
import json
import os
import sys

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util


def read(path):
    version, scalars = None, {}
    for event in EventFileLoader(path).Load():
        if event.HasField("file_version"):
            version = event.file_version
        for value in event.summary.value:
            # The loader migrates simple_value into a scalar tensor.
            number = float(tensor_util.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
            scalars.setdefault(value.tag, []).append([event.step, number])
    return {"name": os.path.basename(path), "version": version, "scalars": scalars}


def main():
    run = sys.argv[1]
    files = sorted(glob.glob(os.path.join(run, "tensorboard", "*tfevents*")))
    print(json.dumps({"files": [read(f) for f in files]}))


if __name__ == "__main__":
    main()
