"""Helpers shared by the reference scripts: CLIP BPE vocabularies written
without any download, deterministic weight perturbation, safetensors output."""

import gzip
import importlib.util
import json
import os

import torch
from safetensors.torch import save_file


def bpe_merges_path():
    """open-clip-torch ships CLIP's BPE merges; find the file without
    importing open_clip (installed with --no-deps, it cannot import)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open-clip-torch is not installed: run `make venv`")
    return os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab(num_merges=None):
    """CLIP's vocabulary and merges exactly as OpenAI's SimpleTokenizer builds
    them (the order that gives the real ids); `num_merges` truncates the merge
    list for tiny fixtures (None: all 48,894, the real 49,408-token vocab)."""
    with gzip.open(bpe_merges_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    if num_merges is not None:
        merges = merges[:num_merges]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer_files(out_dir, num_merges=None, pad_token="<|endoftext|>"):
    """The layout of the real SD repositories' tokenizer/ folder:
    vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json."""
    os.makedirs(out_dir, exist_ok=True)
    vocab, merges = clip_vocab(num_merges)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad_token,
        "unk_token": "<|endoftext|>",
    }
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    config = dict(special)
    config.update(
        {
            "add_prefix_space": False,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": 77,
            "tokenizer_class": "CLIPTokenizer",
        }
    )
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return len(vocab)


@torch.no_grad()
def perturb(module, seed, scale=0.05):
    """Adds seeded noise to every parameter, so that norm scales, biases and
    zero-initialised layers all carry distinct values a mis-loaded tensor
    would show."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters()):
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def save_tensors(path, tensors):
    """Saves a dict of tensors (contiguous float32/int64) as safetensors."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path)
