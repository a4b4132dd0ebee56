"""Golden tensors for the teacher under CPU autocast (worker/tests/autocast.rs).

1. The tiny UNets' outputs for seeded inputs in float32 and under
   torch.autocast("cpu", dtype=bfloat16 / float16): the Rust UNet under the
   precision guard (csrc/autocast.cpp) must match the autocast outputs far
   more closely than they differ from float32.
2. One SwiftBrush iteration on sd1 as golden_vsd.py computes it, except that
   the three teacher passes (frozen, LoRA, LoRA with gradients) run under
   bf16 autocast with their outputs cast to float32 before any schedule,
   guidance or loss arithmetic; the student pass stays float32.
3. The same iteration with the student's forward under bf16 autocast too
   (precision.student_autocast), its output cast to float32 before the x0
   formula, as an accelerate script's mixed precision runs it; the
   backward runs outside the region, as torch.autocast asks.
"""

import os

import torch

import golden_vsd
import pipelines as pl
from common import save_tensors
from golden_vsd import TARGETS

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_pass(unet, x, t, c, dtype):
    """A teacher forward under autocast on the tensors' device (CPU here;
    CUDA when scripts/gpu-check runs vsd_step there); float32 out."""
    with torch.autocast(x.device.type, dtype=dtype):
        out = unet(x, t, c).sample
    return out.float()


@torch.no_grad()
def unet_outputs(root, pipelines):
    for i, kind in enumerate(("sd1", "sd2v")):
        unet = pl.load(pipelines[kind]).unet.eval()
        g = torch.Generator().manual_seed(9100 + i)
        dim = unet.config.cross_attention_dim
        sample = torch.randn(2, 4, 8, 8, generator=g)
        timesteps = torch.tensor([999, 37], dtype=torch.int64)
        context = torch.randn(2, 77, dim, generator=g)
        out = {
            "sample": sample,
            "timesteps": timesteps,
            "encoder_hidden_states": context,
            "out_fp32": unet(sample, timesteps, context).sample,
        }
        for name, dtype in AUTOCAST.items():
            out[f"out_{name}"] = teacher_pass(unet, sample, timesteps, context, dtype)
        save_tensors(os.path.join(root, "golden", "autocast", f"unet_{kind}.safetensors"), out)


def vsd_step(pipe, seed, dtype, device="cpu", student=False):
    """golden_vsd.run with the teacher passes under autocast (and with
    `student`, the student's pass too)."""
    # peft initialises lora_A from the global generator: seed it, so this
    # golden does not depend on what ran before it.
    torch.manual_seed(seed)
    under_autocast = lambda unet, x, t, c: teacher_pass(unet, x, t, c, dtype)  # noqa: E731
    return golden_vsd.run(
        pipe,
        "sd1",
        False,
        seed,
        TARGETS,
        under_autocast,
        device=device,
        student_pass=under_autocast if student else golden_vsd.plain_pass,
    )


def build(root, pipelines):
    unet_outputs(root, pipelines)
    # The Rust test computes the float32 baseline itself on these inputs.
    out = vsd_step(pl.load(pipelines["sd1"]), 21, torch.bfloat16)
    save_tensors(os.path.join(root, "golden", "autocast", "vsd_sd1_bf16.safetensors"), out)
    out = vsd_step(pl.load(pipelines["sd1"]), 21, torch.bfloat16, student=True)
    save_tensors(
        os.path.join(root, "golden", "autocast", "vsd_sd1_bf16_student.safetensors"), out
    )


def vsd_step_on(device, fixtures, out_path):
    """The bf16 golden step run on `device` (scripts/gpu-check: torch.autocast
    on CUDA as the reference of the Rust step under CUDA autocast)."""
    out = vsd_step(pl.load(os.path.join(fixtures, "pipelines", "sd1")), 21, torch.bfloat16, device)
    save_tensors(out_path, out)
