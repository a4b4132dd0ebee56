"""Checks swiftbrush's LoRA exports with the pinned diffusers and peft, for
the Rust export tests (run by them; not a fixture builder, so it has no
build()). Prints one JSON object.

  check_lora_export.py draw PLANS.json
        one process for many drawings: PLANS is a list of {"teacher": DIR, "prompt": P,
        "latents": FILE, "a": A, "out": FILE, "draws": [{"name": N, "kind":
        K, ...}]}. Each draw is SwiftBrush's one-step picture (t = 999,
        x0 = (z - sqrt(1-A) eps) / sqrt(A), VAE decode) of the teacher
        pipeline (StableDiffusionPipeline, or StableDiffusionXLPipeline as
        DIR's model_index.json names it) with its UNet as K says:
          teacher                  as it is
          peft     lora, r, alpha, targets
                                   peft adapters loaded from `lora` (the reference)
          load_lora  path          pipe.load_lora_weights(path) (diffusers or kohya file)
          unet     path            UNet2DConditionModel.from_pretrained(path)
        Writes every picture [B,3,H,W] in [0,1] to `out` under its name and
        prints, per plan, per draw, the LoRA layers (and their scales) and
        the LoraConfig diffusers built.
"""

import copy
import json
import os
import sys

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file


def lora_config(r, alpha, targets):
    from peft import LoraConfig

    return LoraConfig(r=int(r), lora_alpha=float(alpha), target_modules=targets.split(","))


def load_pipeline(path):
    with open(os.path.join(path, "model_index.json")) as f:
        family = json.load(f)["_class_name"]
    if family == "StableDiffusionXLPipeline":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False), True
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    return pipe, False


@torch.no_grad()
def one_step(pipe, xl, unet, prompt, z, a):
    n = z.shape[0]
    t = torch.full((n,), 999)
    if xl:
        embeds, _, pooled, _ = pipe.encode_prompt([prompt] * n, device="cpu", do_classifier_free_guidance=False)
        h, w = z.shape[2] * pipe.vae_scale_factor, z.shape[3] * pipe.vae_scale_factor
        ids = torch.tensor([[h, w, 0, 0, h, w]] * n, dtype=embeds.dtype)
        eps = unet(z, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    else:
        ids = pipe.tokenizer([prompt] * n, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        eps = unet(z, t, pipe.text_encoder(ids)[0]).sample
    if pipe.scheduler.config.prediction_type == "v_prediction":
        eps = a**0.5 * eps + (1 - a) ** 0.5 * z
    x0 = (z - (1 - a) ** 0.5 * eps) / a**0.5
    img = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1).contiguous()


def lora_layers(unet):
    from peft.tuners.lora import LoraLayer

    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    scales = sorted({float(s) for m in layers for s in m.scaling.values()})
    return {"layers": len(layers), "scales": scales}


def draw(plans_file):
    with open(plans_file) as f:
        plans = json.load(f)
    print(json.dumps([draw_plan(plan) for plan in plans]))


def draw_plan(plan):
    from peft.utils import set_peft_model_state_dict

    pipe, xl = load_pipeline(plan["teacher"])
    z = load_file(plan["latents"])["latents"]
    images, report = {}, {}
    for d in plan["draws"]:
        kind, info = d["kind"], {}
        if kind == "teacher":
            unet = pipe.unet
        elif kind == "peft":
            unet = copy.deepcopy(pipe.unet)
            unet.add_adapter(lora_config(d["r"], d["alpha"], d["targets"]))
            result = set_peft_model_state_dict(unet, load_file(d["lora"]))
            assert not result.unexpected_keys, result.unexpected_keys
            info = lora_layers(unet)
        elif kind == "load_lora":
            pipe.load_lora_weights(d["path"], adapter_name=d["name"])
            unet = pipe.unet
            cfg = unet.peft_config[d["name"]]
            info = lora_layers(unet)
            info.update({"r": cfg.r, "lora_alpha": cfg.lora_alpha})
        elif kind == "unet":
            unet, loading = UNet2DConditionModel.from_pretrained(d["path"], output_loading_info=True)
            info = {"missing": loading["missing_keys"], "unexpected": loading["unexpected_keys"]}
        else:
            raise SystemExit(f"unknown draw kind {kind}")
        images[d["name"]] = one_step(pipe, xl, unet, plan["prompt"], z, plan["a"])
        if kind == "load_lora":
            pipe.unload_lora_weights()
        report[d["name"]] = info
    save_file(images, plan["out"])
    return report


if __name__ == "__main__":
    torch.set_num_threads(1)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "draw":
        draw(*args)
    else:
        raise SystemExit(f"unknown command {cmd}")
