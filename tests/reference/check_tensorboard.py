"""Reads a run's TensorBoard event files with TensorBoard's own loader, for
the Rust trainer tests (run by them; not a fixture builder, so it has no
build()). Prints one JSON object:
  {"files": [{"name": ..., "version": ..., "scalars": {tag: [[step, value], ...]},
              "images": {tag: [[step, width, height, sha256 of the PNG], ...]}}]}

  check_tensorboard.py RUN_DIR

The loader checks every record's length and data CRCs and fails on a bad
one, as TensorBoard does.
"""

import glob
import hashlib
import io
import json
import os
import sys

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util


def read(path):
    from PIL import Image

    version, scalars, images = None, {}, {}
    for event in EventFileLoader(path).Load():
        if event.HasField("file_version"):
            version = event.file_version
        for value in event.summary.value:
            # The loader migrates simple_value into a scalar tensor, and an
            # image into the images plugin's tensor [width, height, PNG].
            if value.metadata.plugin_data.plugin_name == "images":
                width, height, png = tensor_util.make_ndarray(value.tensor)[:3]
                decoded = Image.open(io.BytesIO(png))
                assert decoded.size == (int(width), int(height)), (decoded.size, width, height)
                images.setdefault(value.tag, []).append(
                    [event.step, int(width), int(height), hashlib.sha256(png).hexdigest()]
                )
                continue
            number = float(tensor_util.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
            scalars.setdefault(value.tag, []).append([event.step, number])
    return {"name": os.path.basename(path), "version": version, "scalars": scalars, "images": images}


def main():
    run = sys.argv[1]
    files = sorted(glob.glob(os.path.join(run, "tensorboard", "*tfevents*")))
    print(json.dumps({"files": [read(f) for f in files]}))


if __name__ == "__main__":
    main()
