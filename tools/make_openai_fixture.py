#!/usr/bin/env python3
"""Make the tiny OpenAI-CLIP parity fixture in tests/fixtures/clip/openai-tiny/.

It imitates the checkpoints OpenAI released for the `clip` package (`ViT-B-16.pt`
and friends: TorchScript zip archives whose weights went through OpenAI's
`convert_weights`), at a tiny size and with random weights:

  ViT-tiny.pt      TorchScript archive (torch.jit.trace_module of clip.model.CLIP
                   with methods forward, encode_image, encode_text), fp16 weights
  state_dict.pt    torch.save(model.state_dict()) of the same model (zip format)
  reference.json   config, inputs (pixels, tokens), f32 reference embeddings,
                   logit_scale, and the zip entry names of both .pt files
  README.md        what these are and how they were made

The model is OpenAI's own code (clip/model.py from the PyPI package
`clip-anytorch`), loaded as module `clip.model` without running the package's
__init__ (that one needs torchvision / pkg_resources), so TorchScript class
names are `__torch__.clip.model.*`.

Run from the repository root:

    /work/venv/pt/bin/python tools/make_openai_fixture.py

(needs: /work/venv/pt/bin/pip install --no-deps clip-anytorch ftfy regex)
"""

import copy
import importlib
import importlib.util
import json
import os
import sys
import types
import zipfile

import numpy as np
import torch

OUT_DIR = os.path.join("tests", "fixtures", "clip", "openai-tiny")
CONFIG = dict(
    embed_dim=32,
    image_resolution=32,
    vision_layers=2,
    vision_width=64,
    vision_patch_size=8,
    context_length=77,
    vocab_size=1000,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=2,
)
SOT = 998
EOT = 999


def import_clip_model():
    """Import `clip.model` from the installed clip-anytorch without its __init__."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("clip-anytorch is not installed: pip install --no-deps clip-anytorch ftfy regex")
    pkg = types.ModuleType("clip")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["clip"] = pkg
    return importlib.import_module("clip.model")


def f32_list(t):
    """Flatten a tensor into floats that print as the shortest f32 round-trip string."""
    return [float(str(v)) for v in t.detach().to(torch.float32).reshape(-1).numpy()]


def main():
    clip_model = import_clip_model()
    torch.manual_seed(0)

    model = clip_model.CLIP(**CONFIG).eval()
    clip_model.convert_weights(model)  # fp16 like the released files

    # Reference copy: same (fp16-rounded) weights, upcast, computed in f32.
    model_f32 = copy.deepcopy(model).float().eval()

    # Inputs.
    gen = torch.Generator().manual_seed(1234)
    pixels = torch.randn(2, 3, CONFIG["image_resolution"], CONFIG["image_resolution"],
                         generator=gen, dtype=torch.float32)
    tokens = torch.zeros(2, CONFIG["context_length"], dtype=torch.int64)
    for row, n in enumerate((3, 7)):
        ids = torch.randint(1, SOT, (n,), generator=gen)
        tokens[row, 0] = SOT
        tokens[row, 1:1 + n] = ids
        tokens[row, 1 + n] = EOT
    assert (tokens.argmax(dim=-1) == torch.tensor([4, 8])).all()

    # TorchScript archive, traced in fp16 on CPU like OpenAI's (check_trace off).
    example_image = torch.randn(1, 3, CONFIG["image_resolution"], CONFIG["image_resolution"],
                                generator=gen).half()
    example_text = tokens[:1].clone()
    with torch.no_grad():
        traced = torch.jit.trace_module(
            model,
            {
                "forward": (example_image, example_text),
                "encode_image": (example_image,),
                "encode_text": (example_text,),
            },
            check_trace=False,
            _store_inputs=False,  # no traced_inputs.pkl, like OpenAI's 2021 archives
        )
    os.makedirs(OUT_DIR, exist_ok=True)
    ts_path = os.path.join(OUT_DIR, "ViT-tiny.pt")
    torch.jit.save(traced, ts_path)

    sd_path = os.path.join(OUT_DIR, "state_dict.pt")
    torch.save(model.state_dict(), sd_path)

    with torch.no_grad():
        image_embeds = model_f32.encode_image(pixels)
        text_embeds = model_f32.encode_text(tokens)
        image_embeds_half = model.encode_image(pixels.half())
        text_embeds_half = model.encode_text(tokens)

    sd = model.state_dict()
    ref = {
        "description": "Tiny random-weight OpenAI CLIP (ViT) parity fixture; see README.md",
        "config": dict(CONFIG, vision_heads=CONFIG["vision_width"] // 64,
                       activation="quick_gelu", sot_token=SOT, eot_token=EOT),
        "pixels_shape": list(pixels.shape),
        "pixels": f32_list(pixels),
        "tokens": tokens.tolist(),
        "embeds_shape": [2, CONFIG["embed_dim"]],
        "image_embeds": f32_list(image_embeds),
        "text_embeds": f32_list(text_embeds),
        "image_embeds_fp16_model": f32_list(image_embeds_half),
        "text_embeds_fp16_model": f32_list(text_embeds_half),
        "logit_scale": f32_list(sd["logit_scale"])[0],
        "logit_scale_exp": f32_list(sd["logit_scale"].float().exp())[0],
        "state_dict_dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in sd.items()},
        "state_dict_shapes": {k: list(v.shape) for k, v in sd.items()},
        "torchscript_entries": zipfile.ZipFile(ts_path).namelist(),
        "state_dict_entries": zipfile.ZipFile(sd_path).namelist(),
        "notes": [
            "pixels: flattened row-major [2,3,32,32] f32, already 'normalised' (plain N(0,1)).",
            "image_embeds/text_embeds: flattened [2,32], NOT normalised, computed in f32 by a "
            "copy of the model whose weights are the stored weights upcast to f32.",
            "*_fp16_model: same from the fp16 model itself (CPU, PyTorch) for reference.",
            "logit_scale is the raw parameter (log of the scale); logit_scale_exp = exp of it.",
            "convert_weights leaves LayerNorms, embeddings, class/positional embeddings and "
            "logit_scale in f32; see state_dict_dtypes.",
        ],
    }
    with open(os.path.join(OUT_DIR, "reference.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")

    import importlib.metadata as md
    clip_ver = md.version("clip-anytorch")
    readme = f"""# openai-tiny: tiny OpenAI-CLIP checkpoint parity fixture

Random weights (parity fixture only, no semantic meaning). Imitates the
TorchScript checkpoints OpenAI released for the `clip` package (`ViT-B-16.pt` etc.).

- `ViT-tiny.pt`: TorchScript zip archive, `torch.jit.trace_module` of OpenAI's
  `clip.model.CLIP` (methods `forward`, `encode_image`, `encode_text`), traced in
  fp16 on CPU after OpenAI's `convert_weights` (check_trace=False, no
  `traced_inputs.pkl`), saved with `torch.jit.save`. Class names are
  `__torch__.clip.model.*`; the causal attention mask is a traced constant
  (`constants.pkl`). Zip entries live under `ViT-tiny/` (the file stem).
- `state_dict.pt`: `torch.save(model.state_dict())` (default zip format), same weights.
  Dtypes are whatever `convert_weights` gives: Linear/Conv/attention weights,
  `text_projection`, `visual.proj` are fp16; LayerNorms, `token_embedding`,
  `positional_embedding`, `visual.class_embedding`, `visual.positional_embedding`,
  `logit_scale` stay f32.
- `reference.json`: config, inputs (`pixels` [2,3,32,32] flattened, `tokens` [2,77],
  SOT=998 EOT=999 so EOT is each row's argmax), `image_embeds` / `text_embeds`
  ([2,32] flattened, not normalised) computed in f32 from the stored weights upcast,
  the same from the fp16 model, `logit_scale`, per-tensor dtypes/shapes, and the
  zip entry names of both files.

Config: {json.dumps(CONFIG)} (vision heads = width // 64 = 1, QuickGELU, pre-LN).

Made with (from the repository root, seed torch.manual_seed(0)):

    /work/venv/pt/bin/python tools/make_openai_fixture.py

torch {torch.__version__}, clip-anytorch {clip_ver}, numpy {np.__version__}.
"""
    with open(os.path.join(OUT_DIR, "README.md"), "w") as f:
        f.write(readme)

    for name in sorted(os.listdir(OUT_DIR)):
        print(f"{os.path.getsize(os.path.join(OUT_DIR, name)):>9}  {os.path.join(OUT_DIR, name)}")


if __name__ == "__main__":
    main()
