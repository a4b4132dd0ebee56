"""Loads a toy teacher folder written by `swiftbrush toy teacher` with
diffusers and transformers, strictly, and runs it on given inputs, so a
Rust test can compare our forward passes with the reference ones.

usage: toy_diffusers_check.py TEACHER_DIR INPUTS.safetensors OUTPUTS.safetensors

INPUTS holds `sample` [B,3,32,32], `timestep` [B] (int64),
`encoder_hidden_states` [B,77,D] and `input_ids` [N,77] (int64).
OUTPUTS gets `unet_out` (the UNet on sample/timestep/encoder_hidden_states),
`text_hidden` (the text encoder's last hidden state on input_ids) and
`alphas_cumprod` (the scheduler's). The tokenizer's ids for the 54 captions
and "" are written as `caption_ids` [55,77]. Exits non-zero, naming the
keys, if any weight is missing, unexpected or mis-shaped.
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def captions():
    colors = ["red", "green", "blue", "yellow", "magenta", "cyan"]
    shapes = ["circle", "square", "triangle"]
    backgrounds = ["white", "black", "gray"]
    out = [f"a {c} {s} on a {b} background" for c in colors for s in shapes for b in backgrounds]
    return out + [""]


def check_info(what, info):
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") and v}
    if bad:
        print(f"{what}: loading problems: {json.dumps(bad, default=str)}", file=sys.stderr)
        sys.exit(1)


@torch.no_grad()
def main():
    teacher, inputs_path, outputs_path = sys.argv[1:4]
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(1)
    inputs = load_file(inputs_path)
    unet, info = UNet2DConditionModel.from_pretrained(f"{teacher}/unet", output_loading_info=True)
    check_info("unet", info)
    text, info = CLIPTextModel.from_pretrained(f"{teacher}/text_encoder", output_loading_info=True)
    check_info("text_encoder", info)
    tokenizer = CLIPTokenizer.from_pretrained(f"{teacher}/tokenizer")
    scheduler = DDIMScheduler.from_pretrained(f"{teacher}/scheduler")
    unet.eval()
    text.eval()
    out = unet(
        inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"]
    ).sample
    hidden = text(inputs["input_ids"]).last_hidden_state
    ids = tokenizer(captions(), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    save_file(
        {
            "unet_out": out.contiguous(),
            "text_hidden": hidden.contiguous(),
            "caption_ids": ids.to(torch.int64).contiguous(),
            "alphas_cumprod": scheduler.alphas_cumprod.to(torch.float32).contiguous(),
        },
        outputs_path,
    )


if __name__ == "__main__":
    main()
