"""Checks an exported student with the pinned diffusers and peft, for the
Rust export tests (run by them; not a fixture builder, so it has no
build()). Prints one JSON object.

  check_export.py unet DIR                     UNet2DConditionModel.from_pretrained(DIR)
  check_export.py pipeline DIR PROMPT LATENTS OUT A
        loads the pipeline folder, runs SwiftBrush's one-step sampling
        (t = 999, x0 = (z - sqrt(1-A) eps) / sqrt(A), VAE decode) from the
        safetensors `latents` and writes `images` [B,3,H,W] in [0,1] to OUT;
        DIR and OUT may be comma-separated lists of the same length
  check_export.py stock DIR PROMPT SEED OUT STEPS [LATENTS]
        diffusers' stock call on the exported folder, as a user writes it:
        StableDiffusionPipeline (or, as DIR's model_index.json names it,
        StableDiffusionXLPipeline).from_pretrained(DIR)(PROMPT,
        num_inference_steps=STEPS, guidance_scale=0,
        generator=torch.Generator().manual_seed(SEED), output_type="pt"),
        with latents=LATENTS when given; STEPS may be a comma-separated list
        of timesteps (then timesteps=[...]). Writes `images` to OUT and prints
        the scheduler's class and timesteps
  check_export.py peft UNET_DIR LORA RANK ALPHA TARGETS
        attaches peft LoRA adapters and loads LORA with set_peft_model_state_dict
"""

import json
import os
import sys

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file


def unet(path):
    model, info = UNet2DConditionModel.from_pretrained(path, output_loading_info=True)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": n, "missing": info["missing_keys"], "unexpected": info["unexpected_keys"]}))


@torch.no_grad()
def pipeline(path, prompt, latents_file, out, a):
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    z = load_file(latents_file)["latents"]
    ids = pipe.tokenizer([prompt] * z.shape[0], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    cond = pipe.text_encoder(ids)[0]
    t = torch.full((z.shape[0],), 999)
    out_eps = pipe.unet(z, t, cond).sample
    if pipe.scheduler.config.prediction_type == "v_prediction":
        out_eps = a**0.5 * out_eps + (1 - a) ** 0.5 * z
    x0 = (z - (1 - a) ** 0.5 * out_eps) / a**0.5
    img = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
    save_file({"images": (img / 2 + 0.5).clamp(0, 1).contiguous()}, out)
    print(json.dumps({"ok": True}))


@torch.no_grad()
def stock(path, prompt, seed, out, steps, latents_file=None):
    with open(os.path.join(path, "model_index.json")) as f:
        family = json.load(f)["_class_name"]
    if family == "StableDiffusionXLPipeline":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    kwargs = {}
    if "," in steps:
        kwargs["timesteps"] = [int(t) for t in steps.split(",")]
    else:
        kwargs["num_inference_steps"] = int(steps)
    if latents_file:
        z = load_file(latents_file)["latents"]
        kwargs["latents"] = z
        # The picture's size is the noise's (SDXL's time ids read it).
        kwargs["height"] = z.shape[2] * pipe.vae_scale_factor
        kwargs["width"] = z.shape[3] * pipe.vae_scale_factor
    images = pipe(
        prompt,
        guidance_scale=0,
        generator=torch.Generator().manual_seed(int(seed)),
        output_type="pt",
        **kwargs,
    ).images
    save_file({"images": images.contiguous()}, out)
    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    print(json.dumps({"scheduler": type(pipe.scheduler).__name__, "timesteps": timesteps}))


def peft(unet_dir, lora, rank, alpha, targets):
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    model = UNet2DConditionModel.from_pretrained(unet_dir)
    model.add_adapter(LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=targets.split(",")))
    result = set_peft_model_state_dict(model, load_file(lora))
    missing = [k for k in result.missing_keys if "lora_" in k]
    print(json.dumps({"missing": missing, "unexpected": list(result.unexpected_keys)}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "unet":
        unet(*args)
    elif cmd == "pipeline":
        # DIR and OUT may be comma-separated lists (one process, one import
        # of torch and diffusers, for several folders).
        for path, out in zip(args[0].split(","), args[3].split(","), strict=True):
            pipeline(path, args[1], args[2], out, float(args[4]))
    elif cmd == "stock":
        stock(*args)
    elif cmd == "peft":
        peft(*args)
    else:
        raise SystemExit(f"unknown command {cmd}")
