"""The whole teacher sampling path: StableDiffusionPipeline with DDIM,
4 steps, guidance 4.5, from given latents, for each fixture pipeline.
`swiftbrush sample --teacher` on the same latents must reproduce the images
(float32 [B,3,H,W] in [0,1], and the PNG of the first prompt)."""

import os

import torch

from common import save_tensors
from pipelines import load

PROMPTS = ["a red circle on a white background", "a photo of a cat, 4k"]
STEPS = 4
GUIDANCE = 4.5


def build(root, pipelines):
    for i, (kind, path) in enumerate(sorted(pipelines.items())):
        pipe = load(path)
        g = torch.Generator().manual_seed(300 + i)
        latents = torch.randn((len(PROMPTS), 4, 8, 8), generator=g)
        out_dir = os.path.join(root, "golden", "sample", kind)
        save_tensors(os.path.join(out_dir, "latents.safetensors"), {"latents": latents})
        images = pipe(
            prompt=PROMPTS,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=latents.clone(),
            output_type="pt",
        ).images
        save_tensors(os.path.join(out_dir, "images.safetensors"), {"images": images.float()})
        one = pipe(
            prompt=PROMPTS[:1],
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=latents[:1].clone(),
            output_type="pil",
        ).images[0]
        save_tensors(os.path.join(out_dir, "latents0.safetensors"), {"latents": latents[:1]})
        one.save(os.path.join(out_dir, "first.png"))
        with open(os.path.join(out_dir, "prompts.txt"), "w") as f:
            f.write("\n".join(PROMPTS) + "\n")
