"""How much the student's x0 moves when its forward runs under autocast
(issue 23 item 1; docs/ARCHITECTURE.md "Precision").

x0 = (z - sqrt(1 - A) eps) / sqrt(A) multiplies any error of the student's
output eps by sqrt(1 - A) / sqrt(A) = 14.6 at A = 0.0047. This runs an
SD 2.1-base-shaped UNet (bench/make_sd21_shaped_teacher.py's "full" scale,
random weights) at t = 999 on seeded noise in float32, under CPU autocast
bf16 and fp16, each with conv_out under autocast and with conv_out kept in
float32 (its input cast up), and prints, per variant:

  eps_rel  rms(eps_half - eps_fp32) / std(eps_fp32): the network's rounding
  x0_rel   rms(x0_half - x0_fp32) / std(x0_fp32) on these random weights
  x0_unit  rms(x0_half - x0_fp32) * std(eps)^-1: the same error for a
           trained student, whose eps and x0 both have std ~1 (SD latents
           are scaled to unit variance), relative to that signal

Usage: .venv/bin/python scripts/measure_student_x0.py [--latent 32] [--batch 1]
"""

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import make_sd21_shaped_teacher as shaped  # noqa: E402

A = 0.0047


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--scale", default="full")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    s = shaped.SCALES[args.scale]
    unet = shaped.unet(s).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    z = torch.randn(args.batch, 4, args.latent, args.latent, generator=g)
    cond = torch.randn(args.batch, 77, s["text"]["hidden_size"], generator=g)
    t = torch.full((args.batch,), 999, dtype=torch.int64)

    conv_out = unet.conv_out.forward

    def fp32_head(x):
        with torch.autocast("cpu", enabled=False):
            return conv_out(x.float())

    def x0_of(eps):
        return (z - (1 - A) ** 0.5 * eps) / A**0.5

    with torch.no_grad():
        t0 = time.time()
        eps32 = unet(z, t, cond).sample.float()
        print(f"fp32 forward {time.time() - t0:.1f}s; eps std {eps32.std():.4f}", flush=True)
        x032 = x0_of(eps32)
        rms = lambda d: d.pow(2).mean().sqrt().item()  # noqa: E731
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            for head in ("autocast", "fp32"):
                unet.conv_out.forward = fp32_head if head == "fp32" else conv_out
                t0 = time.time()
                with torch.autocast("cpu", dtype=dtype):
                    eps = unet(z, t, cond).sample
                eps = eps.float()
                x0 = x0_of(eps)
                e = rms(eps - eps32)
                print(
                    f"{name} conv_out {head:8s}: eps_rel {e / eps32.std().item():.2e}  "
                    f"x0_rel {rms(x0 - x032) / x032.std().item():.2e}  "
                    f"x0_unit {rms(x0 - x032) / eps32.std().item():.2e}  "
                    f"({time.time() - t0:.1f}s)",
                    flush=True,
                )
        unet.conv_out.forward = conv_out


if __name__ == "__main__":
    main()
