"""CLIP score as transformers computes it: a tiny random CLIPModel folder
(what `swiftbrush eval clip-score --clip DIR` reads: config.json,
model.safetensors, preprocessor_config.json and the tokenizer files, as
the Hugging Face CLIP repositories ship them), and its image and text
embeddings for fixed pictures and prompts.

Writes root/clip_model/ (the folder) and root/golden/clip_score/:
  <case>.safetensors   "images" uint8 [N,H,W,3] (the pictures),
                       "pixel_values" float32 [N,3,S,S] (CLIPImageProcessor),
                       "input_ids" int64 [N,77], "image_embeds" and
                       "text_embeds" float32 [N,P] (projected, not
                       normalised), "scores" float32 [N] (cosine similarity
                       of each picture with its prompt)
  prompts.json         PROMPTS
for case in up (16x16 pictures: upsampled, as a tiny student's are) and
down (64x48: the shortest side resized, then centre-cropped).
"""

import json
import os

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from common import perturb, save_tensors, write_clip_tokenizer_files
from pipelines import NUM_MERGES

PROMPTS = ["a red circle", "a photo of a cat", "An astronaut riding a horse on Mars!"]
IMAGE_SIZE = 30


def pictures(seed, n, h, w):
    """Smooth gradients with some noise: resampling is tested on both."""
    g = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        base = np.stack(
            [
                128 + 100 * np.sin(xs / (3 + i) + c) * np.cos(ys / (4 + c))
                for c in range(3)
            ],
            axis=-1,
        )
        noisy = base + g.normal(0, 20, size=base.shape)
        out.append(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    return np.stack(out)


def build(root, pipelines):
    folder = os.path.join(root, "clip_model")
    os.makedirs(folder, exist_ok=True)
    vocab_size = write_clip_tokenizer_files(folder, NUM_MERGES)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=IMAGE_SIZE,
            patch_size=6,
            hidden_act="gelu",
        ),
        projection_dim=16,
    )
    torch.manual_seed(77)
    model = CLIPModel(config).eval()
    perturb(model, seed=78)
    model.save_pretrained(folder, safe_serialization=True)
    # The PIL backend explicitly: what CLIP score tools have long run, and
    # what CLIPImageProcessor falls back to without torchvision.
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor.save_pretrained(folder)

    out = os.path.join(root, "golden", "clip_score")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "prompts.json"), "w") as f:
        json.dump(PROMPTS, f)
    n = len(PROMPTS)
    for case, (h, w) in {"up": (16, 16), "down": (48, 64)}.items():
        images = pictures(1 if case == "up" else 2, n, h, w)
        pixel_values = processor(
            images=[Image.fromarray(im) for im in images], return_tensors="pt"
        ).pixel_values
        ids = tokenizer(
            PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            text_embeds = model.text_projection(model.text_model(input_ids=ids).pooler_output)
            image_embeds = model.visual_projection(
                model.vision_model(pixel_values=pixel_values).pooler_output
            )
        scores = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        save_tensors(
            os.path.join(out, f"{case}.safetensors"),
            {
                "images": torch.from_numpy(images),
                "pixel_values": pixel_values.float(),
                "input_ids": ids.to(torch.int64),
                "image_embeds": image_embeds.float(),
                "text_embeds": text_embeds.float(),
                "scores": scores.float(),
            },
        )
