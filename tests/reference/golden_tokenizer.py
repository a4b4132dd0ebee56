"""Token ids of CLIP's tokenizer, as diffusers' StableDiffusionPipeline calls
it (padding="max_length", max_length=77, truncation=True), for varied prompts.

Tokenizers covered: the full real CLIP vocabulary (vocab.json + merges.txt,
padded with <|endoftext|> as SD 1.x and with "!" as SD 2.x), the same with
special tokens written as AddedToken dicts (normalized: true) as in the real
SD 1.5 repository's tokenizer_config.json / special_tokens_map.json, the full
vocabulary saved by transformers as tokenizer.json, and the fixture
pipelines' own tokenizers (sd1: vocab + merges, sd2: tokenizer.json).

Writes root/golden/tokenizer/:
  prompts.json              the prompt list, in order
  tokenizers.json           {name: tokenizer folder relative to root}
  ids.safetensors           "<name>": int64 [num_prompts, 77]
                            "<name>.truncated": int64 [num_prompts] (1 = cut)
"""

import json
import os

import torch
from transformers import CLIPTokenizer

from common import save_tensors, write_clip_tokenizer_files

PROMPTS = [
    "",
    " ",
    "a photo of a cat",
    "A Photo Of A Cat",
    "A PHOTO OF A CAT",
    "an astronaut riding a horse on mars, highly detailed, 8k",
    "don't stop believin'",
    "it's the cat's pajamas; they're great, we've seen, I'm sure, you'll see, he'd go",
    "DON'T SHOUT, IT'S LOUD",
    "rock'n'roll",
    "hello!",
    "hello!!! world?!",
    "!!!",
    "a!b!c",
    "1234567890",
    "the year 2024 and 3.14159",
    "100% cotton, $5.99 or €4,50",
    "e = mc^2",
    "x_1 + x_2 = y-3",
    "café crème brûlée",
    "cafe\u0301 (decomposed accent)",
    "naïve façade über straße",
    "ÀÉÎÕÜ ÇÑ",
    "日本語のテキスト",
    "中文提示词，一只猫",
    "한국어 문장",
    "Русский текст про кота",
    "Ελληνικά γράμματα",
    "עברית וערבية",
    "emoji 🐱🚀✨ party 🎉",
    "flags 🇯🇵🇺🇸 and family 👨‍👩‍👧",
    "a    lot     of      spaces",
    "tabs\tand\ttabs",
    "new\nlines\n\nhere",
    "  leading and trailing  ",
    "\t\n mixed \r\n whitespace \u00a0 nbsp \u2003 em space",
    "https://example.com/path?query=1&x=y#frag",
    "email me at someone@example.org",
    "#hashtag @mention",
    "(masterpiece:1.2), [best quality], {ultra detailed}",
    "a dog, a cat; a bird: a fish.",
    "quotes \"double\" and 'single' and `back`",
    "ellipsis... and dashes -- and — em",
    "<|startoftext|> inside a prompt",
    "a prompt with <|endoftext|> in the middle",
    "UPPER <|ENDOFTEXT|> case special",
    "<|STARTOFTEXT|>upper start<|startoftext|>",
    "C++ and C# and F#",
    "snake_case and camelCase and kebab-case",
    "slashes / back\\slashes | pipes",
    "math ∑ ∫ √ ∞ ≈ ≠",
    "zero\u200bwidth\u200bspace",
    "ﬁ ligature and ｆｕｌｌｗｉｄｔｈ",
    "ǅ titlecase and İstanbul",
    "a " * 100,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(f"word{i}" for i in range(80)),
    "one two three four five six seven eight nine ten " * 8,
    "exactly seventy five tokens " + "cat " * 71,
    "exactly seventy six tokens " + "cat " * 72,
    "a painting of a fox sitting in a field at sunrise, trending on artstation, "
    "by greg rutkowski and alphonse mucha, octane render, unreal engine, 4k, "
    "volumetric lighting, dramatic clouds, intricate, elegant, sharp focus, "
    "illustration, concept art, matte painting, golden hour, bokeh, highly detailed, "
    "hyperrealistic, 8k uhd, dslr, soft lighting, high quality, film grain, fujifilm xt3",
]


def token_ids(tokenizer, prompts):
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    untruncated = tokenizer(prompts, padding="do_not_pad", truncation=False).input_ids
    truncated = torch.tensor([len(u) > tokenizer.model_max_length for u in untruncated], dtype=torch.int64)
    return ids.to(torch.int64), truncated


def write_sd15_style_specials(folder):
    """Special tokens as the real SD 1.5 repository stores them: AddedToken
    dicts with normalized=true, the pad token as a plain string."""

    def added(content, typed):
        token = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        return dict(token, __type="AddedToken") if typed else token

    config = {
        "add_prefix_space": False,
        "bos_token": added("<|startoftext|>", True),
        "do_lower_case": True,
        "eos_token": added("<|endoftext|>", True),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added("<|endoftext|>", True),
    }
    special = {
        "bos_token": added("<|startoftext|>", False),
        "eos_token": added("<|endoftext|>", False),
        "pad_token": "<|endoftext|>",
        "unk_token": added("<|endoftext|>", False),
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)


def build(root, pipelines):
    out = os.path.join(root, "golden", "tokenizer")
    os.makedirs(out, exist_ok=True)
    folders = {
        "full_eot": os.path.join(out, "full_eot"),
        "full_bang": os.path.join(out, "full_bang"),
        "full_sd15": os.path.join(out, "full_sd15"),
        "full_json": os.path.join(out, "full_json"),
        "sd1": os.path.join(pipelines["sd1"], "tokenizer"),
        "sd2": os.path.join(pipelines["sd2"], "tokenizer"),
    }
    write_clip_tokenizer_files(folders["full_eot"], None)
    write_clip_tokenizer_files(folders["full_bang"], None, pad_token="!")
    write_clip_tokenizer_files(folders["full_sd15"], None)
    write_sd15_style_specials(folders["full_sd15"])
    # transformers 5 saves tokenizer.json only: the layout of a re-saved pipeline.
    CLIPTokenizer.from_pretrained(folders["full_bang"]).save_pretrained(folders["full_json"])
    for f in ("vocab.json", "merges.txt"):
        path = os.path.join(folders["full_json"], f)
        if os.path.exists(path):
            os.remove(path)
    assert os.path.exists(os.path.join(folders["full_json"], "tokenizer.json"))

    tensors = {}
    for name, folder in folders.items():
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        assert tokenizer.model_max_length == 77, name
        ids, truncated = token_ids(tokenizer, PROMPTS)
        tensors[name] = ids
        tensors[f"{name}.truncated"] = truncated
    # The two prompts named "exactly ..." sit on either side of the limit.
    full = tensors["full_eot"]
    assert tensors["full_eot.truncated"].tolist()[-5:] == [1, 1, 0, 1, 1]
    assert (full[:, 0] == 49406).all()
    # Dict-form specials are normalized: an upper-case <|STARTOFTEXT|> matches.
    row = PROMPTS.index("<|STARTOFTEXT|>upper start<|startoftext|>")
    assert not torch.equal(tensors["full_eot"][row], tensors["full_sd15"][row])

    save_tensors(os.path.join(out, "ids.safetensors"), tensors)
    with open(os.path.join(out, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(PROMPTS, f, ensure_ascii=False, indent=1)
    with open(os.path.join(out, "tokenizers.json"), "w") as f:
        json.dump({k: os.path.relpath(v, root) for k, v in folders.items()}, f, indent=1)
