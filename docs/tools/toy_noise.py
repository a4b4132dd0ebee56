"""Pixel-noise figures of one-step toy samples (docs/TOYWORLD.md, "Runs").

    swiftbrush sample --student RUN --prompts runs/demo/captions.txt --seed 1 \
        --batch-size 54 --device cpu --out /tmp/s.png --raw-out /tmp/s.safetensors
    .venv/bin/python docs/tools/toy_noise.py /tmp/s.safetensors

Prints, averaged over the images (tensor `images`, [B, 3, H, W] in [0, 1]):
- residual: the standard deviation (0..255) of each pixel minus the median
  of its 3x3 neighbourhood, per channel: high-frequency noise;
- specks: pixels farther than 80 (RGB Euclidean, the evaluator's threshold)
  from that median;
- stray: shape pixels (farther than 80 from the judged background color)
  outside the largest 4-connected shape component, which stretch the
  evaluator's bounding box and make it call every shape a triangle.
A diagnostic, not part of the evaluator.
"""

import sys

import numpy as np
import torch
from safetensors.torch import load_file

BACKGROUNDS = np.array([[245, 245, 245], [15, 15, 15], [128, 128, 128]], float)


def largest_component(mask):
    seen = np.zeros(mask.shape, bool)
    best = 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        best = max(best, size)
    return best


def main(path):
    x = load_file(path)["images"].float() * 255
    b, c, h, w = x.shape
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    med = p.unfold(2, 3, 1).unfold(3, 3, 1).reshape(b, c, h, w, 9).median(-1).values
    r = x - med
    specks = (r.pow(2).sum(1).sqrt() > 80).float().sum((1, 2)).mean().item()
    stray = []
    for img in x.numpy().transpose(0, 2, 3, 1):
        border = np.concatenate(
            [img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
             img[2:-2, :2].reshape(-1, 3), img[2:-2, -2:].reshape(-1, 3)]
        )
        med_border = np.median(border, 0)
        bg = BACKGROUNDS[np.argmin(((BACKGROUNDS - med_border) ** 2).sum(1))]
        mask = np.sqrt(((img - bg) ** 2).sum(2)) > 80
        stray.append(mask.sum() - largest_component(mask))
    print(f"residual {r.std().item():.2f}  specks {specks:.1f}  stray {np.mean(stray):.1f}  ({b} images)")


if __name__ == "__main__":
    main(sys.argv[1])
