"""The SDXL teacher path on the tiny SDXL fixture (pipelines_xl.py):
StableDiffusionXLPipeline, 4 steps, guidance 4.5, from given latents, with
DDIMScheduler and with the folder's EulerDiscreteScheduler. Also the parts,
for locating a difference: encode_prompt's four outputs, add_time_ids, and
one UNet pass with the added conditions. `swiftbrush sample --teacher` on
the same latents must reproduce the images."""

import os

import torch
from diffusers import DDIMScheduler

from common import save_tensors
from pipelines_xl import load

PROMPTS = ["a red circle on a white background", "a photo of a cat, 4k"]
STEPS = 4
GUIDANCE = 4.5


@torch.no_grad()
def build(root, _pipelines):
    path = os.path.join(root, "pipelines", "sdxl")
    out_dir = os.path.join(root, "golden", "sample_xl")
    pipe = load(path)
    g = torch.Generator().manual_seed(400)
    latents = torch.randn((len(PROMPTS), 4, 8, 8), generator=g)
    save_tensors(os.path.join(out_dir, "latents.safetensors"), {"latents": latents})
    with open(os.path.join(out_dir, "prompts.txt"), "w") as f:
        f.write("\n".join(PROMPTS) + "\n")

    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    time_ids = pipe._get_add_time_ids(
        (16, 16), (0, 0), (16, 16), dtype=embeds.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    t = torch.tensor([999.0, 250.0])
    x = torch.randn((2, 4, 8, 8), generator=g)
    unet_out = pipe.unet(
        x, t, encoder_hidden_states=embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(2, 1)},
    ).sample
    save_tensors(
        os.path.join(out_dir, "parts.safetensors"),
        {
            "prompt_embeds": embeds, "negative_prompt_embeds": neg,
            "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": neg_pooled,
            "add_time_ids": time_ids, "unet_x": x, "unet_t": t, "unet_out": unet_out,
        },
    )

    # A DDIM folder as SD 2.1 ships one (no x0 clipping, alpha_T = abar_0).
    for name, overrides in (("ddim", {"clip_sample": False, "set_alpha_to_one": False}), ("euler", None)):
        pipe = load(path)
        if overrides is not None:
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **overrides)
        images = pipe(
            prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            latents=latents.clone(), output_type="pt",
        ).images
        save_tensors(os.path.join(out_dir, f"images_{name}.safetensors"), {"images": images.float()})
        pipe.scheduler.save_config(os.path.join(out_dir, f"scheduler_{name}"))
