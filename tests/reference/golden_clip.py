"""The CLIP text encoder's last hidden state, as diffusers'
StableDiffusionPipeline.encode_prompt computes it, and the parameter names,
shapes and counts of the real SD 1.5 / SD 2.1-base text encoders.

Writes root/golden/clip/:
  <pipeline>.safetensors    "input_ids" int64 [P,77], "last_hidden_state"
                            float32 [P,77,hidden] for PROMPTS
  prompts.json              PROMPTS
  sd1_legacy/model.safetensors
                            sd1's text encoder in the layout of the real SD
                            repositories (transformers 4 era): every key under
                            "text_model." plus the int64 position_ids buffer
  params_<name>.json        for name in sd15, sd21: the config file used, the
                            parameter count, and {key: shape} of transformers'
                            CLIPTextModel (unprefixed, what transformers 5
                            saves) and of the "text_model." sub-module of
                            CLIPTextModelWithProjection (the prefixed layout of
                            the real repositories), built on the meta device
"""

import json
import os

import torch
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from common import save_tensors
from pipelines import PIPELINES, load

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIGS = os.path.join(REPO, "worker", "src", "models", "configs")

PROMPTS = [
    "",
    "a photo of a cat",
    "An astronaut riding a horse on Mars, highly detailed!",
    "don't panic: 42 towels, 7 dolphins & 1 heart of gold " * 8,
]


@torch.no_grad()
def encode(pipe, prompts):
    tok = pipe.tokenizer
    ids = tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    # diffusers' own path: tokenizer + text encoder (+ attention mask only if
    # the config asks for it, which SD's does not).
    embeds, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    direct = pipe.text_encoder(ids)[0]
    assert torch.equal(embeds, direct)
    return ids.to(torch.int64), embeds.float()


def param_layout(config_path):
    with open(config_path) as f:
        text = f.read()
    cfg = CLIPTextConfig.from_dict(json.loads(text))
    with torch.device("meta"):
        plain = CLIPTextModel(cfg)
        with_projection = CLIPTextModelWithProjection(cfg)
    unprefixed = {k: list(v.shape) for k, v in plain.state_dict().items()}
    prefixed = {
        k: list(v.shape) for k, v in with_projection.state_dict().items() if k.startswith("text_model.")
    }
    return {
        "config_text": text,
        "num_params": sum(p.numel() for p in plain.parameters()),
        "unprefixed": unprefixed,
        "prefixed": prefixed,
    }


def build(root, pipelines):
    out = os.path.join(root, "golden", "clip")
    os.makedirs(out, exist_ok=True)
    for kind in PIPELINES:
        pipe = load(pipelines[kind])
        # The long prompt is truncated on purpose: keep diffusers' warning quiet.
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            ids, hidden = encode(pipe, PROMPTS)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        save_tensors(os.path.join(out, f"{kind}.safetensors"), {"input_ids": ids, "last_hidden_state": hidden})
    with open(os.path.join(out, "prompts.json"), "w") as f:
        json.dump(PROMPTS, f, indent=1)

    src = load_file(os.path.join(pipelines["sd1"], "text_encoder", "model.safetensors"))
    assert not any(k.startswith("text_model.") for k in src), "transformers now saves prefixed keys"
    legacy = {f"text_model.{k}": v.contiguous() for k, v in src.items()}
    legacy["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64).unsqueeze(0)
    os.makedirs(os.path.join(out, "sd1_legacy"), exist_ok=True)
    save_file(legacy, os.path.join(out, "sd1_legacy", "model.safetensors"))

    for name, file in (("sd15", "sd15_text_encoder.json"), ("sd21", "sd21_text_encoder.json")):
        layout = param_layout(os.path.join(CONFIGS, file))
        with open(os.path.join(out, f"params_{name}.json"), "w") as f:
            json.dump(layout, f, indent=1, sort_keys=True)
