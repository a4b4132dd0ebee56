"""The text conditions with the text encoders held in half precision, as
diffusers' training scripts hold them (`text_encoder.to(weight_dtype)`), for
`precision.text_encoder_dtype`: diffusers' encode_prompt on the tiny sd1 and
SDXL fixtures with the encoder(s) cast to bf16 and to fp16, the outputs
widened to float32 (what swiftbrush's conditioner hands on).

Writes root/golden/text_dtype/:
  prompts.json                   PROMPTS
  sd1_<dtype>.safetensors        "hidden" [P,77,D]
  sdxl_<dtype>.safetensors       "hidden" [P,77,D1+D2], "pooled" [P,P2]
for dtype in bf16, fp16.
"""

import json
import os

import torch
from diffusers.utils import logging as diffusers_logging

import pipelines
import pipelines_xl
from common import save_tensors

PROMPTS = [
    "",
    "a photo of a cat",
    "An astronaut riding a horse on Mars, highly detailed!",
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def build(root, paths):
    out = os.path.join(root, "golden", "text_dtype")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "prompts.json"), "w") as f:
        json.dump(PROMPTS, f, indent=1)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        for name, dtype in DTYPES.items():
            pipe = pipelines.load(paths["sd1"])
            pipe.text_encoder.to(dtype)
            hidden, _ = pipe.encode_prompt(
                PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            assert hidden.dtype == dtype
            save_tensors(os.path.join(out, f"sd1_{name}.safetensors"), {"hidden": hidden.float()})

            pipe = pipelines_xl.load(os.path.join(root, "pipelines", "sdxl"))
            pipe.text_encoder.to(dtype)
            pipe.text_encoder_2.to(dtype)
            hidden, _, pooled, _ = pipe.encode_prompt(
                PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            assert hidden.dtype == dtype and pooled.dtype == dtype
            save_tensors(
                os.path.join(out, f"sdxl_{name}.safetensors"),
                {"hidden": hidden.float(), "pooled": pooled.float()},
            )
    finally:
        diffusers_logging.set_verbosity(verbosity)
