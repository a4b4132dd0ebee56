"""One SwiftBrush iteration on the tiny SDXL fixture (pipelines_xl.py):
golden_vsd.py's iteration (the same code) with SDXL's conditions. The
student, the teacher and the fake score (LoRA and DMD2's full copy) all
take the added conditions: the pooled embedding of text_encoder_2 and the
time ids (16, 16, 0, 0, 16, 16) of the 16-pixel images; the null condition
is zeros (force_zeros_for_empty_prompt) with the same time ids, as
StableDiffusionXLPipeline builds it.

The condition is saved packed as the Rust step carries it
(worker/src/pipeline/xl_condition.rs): [B, 77 + 2, D], the text states, a
row with the pooled embedding (zero-padded), a row with the time ids."""

import os

import torch

from common import save_tensors
from golden_vsd import PROMPTS, TARGETS, run
from pipelines_xl import load

SIZE = 16


def pack(hidden, pooled, time_ids):
    b, _, d = hidden.shape
    extra = torch.zeros(b, 2, d, dtype=hidden.dtype)
    extra[:, 0, : pooled.shape[1]] = pooled
    extra[:, 1, :6] = time_ids
    return torch.cat([hidden, extra], 1)


def xl_pass(pooled_dim):
    def forward(unet, x, t, c):
        added = {"text_embeds": c[:, -2, :pooled_dim], "time_ids": c[:, -1, :6]}
        return unet(x, t, c[:, :-2], added_cond_kwargs=added).sample

    return forward


@torch.no_grad()
def conditions(pipe):
    hidden, _, pooled, _ = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    ids = pipe._get_add_time_ids(
        (SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=hidden.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    cond = pack(hidden, pooled, ids.repeat(len(PROMPTS), 1))
    uncond = pack(torch.zeros_like(hidden[:1]), torch.zeros_like(pooled[:1]), ids)
    return cond, uncond


CASES = ((False, 41, "lora"), (True, 42, "lora"), (True, 43, "unet"))


def build_case(root, pipeline_dir, null_condition, seed, fake):
    """One case into root/golden/vsd/ (scripts/gpu-check makes the first
    on the device's CPU, beside a fixture it builds there)."""
    pipe = load(pipeline_dir)
    xl = xl_pass(pipe.text_encoder_2.config.projection_dim)
    out = run(
        pipe, "sdxl", null_condition, seed, TARGETS, teacher_pass=xl, student_pass=xl,
        fake=fake, conditions=conditions(pipe),
    )
    suffix = "_fullfake" if fake == "unet" else ""
    name = f"sdxl{suffix}_null{int(null_condition)}.safetensors"
    save_tensors(os.path.join(root, "golden", "vsd", name), out)


def build(root, _pipelines):
    for case in CASES:
        build_case(root, os.path.join(root, "pipelines", "sdxl"), *case)
