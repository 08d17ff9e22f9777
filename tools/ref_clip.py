#!/usr/bin/env python3
"""Reference fixtures for the `capt-clip` crate (tests/fixtures/clip/).

Builds a tiny random HF `transformers.CLIPModel` of the real CLIP architecture (fixed seed), saves it in
HF format (config.json + model.safetensors, HF tensor names) and as an OpenAI/open_clip-named state dict,
and writes reference outputs computed in float64 from the HF modules:

  tiny-hf/config.json, tiny-hf/model.safetensors   HF format (f32 weights)
  tiny-openai/model.safetensors                     same weights, OpenAI names (no config.json)
  reference.safetensors                             inputs and float64 outputs (names below)
  openai-clip-vit-base-patch16.config.json          config.json in the layout of the hub's
                                                    openai/clip-vit-base-patch16 (for the parser test)

The OpenAI-name mapping written here is checked independently: the OpenAI-named dict is loaded into an
open_clip `CLIP` of the same shape and must reproduce the HF embeddings.

The prompt paths (shared / class-specific context spliced after SOT, deep text prompts replacing the
prompt slots in text layers 1..d-1, visual prompts appended after the patch tokens before `pre_layrnorm`
in layer 0 and replacing them before later layers) are written here from the HF submodules; with no
prompts they must reproduce `CLIPModel` itself (asserted below).

Run (from the repository root; CI does not run it, the outputs are committed):
    /work/venv/ref/bin/python tools/ref_clip.py            # writes tests/fixtures/clip/
    /work/venv/ref/bin/python tools/ref_clip.py --out DIR  # elsewhere
    /work/venv/ref/bin/python tools/ref_clip.py --bench-torch image1,image8,text
        # PyTorch eager timings of the cases of `cargo bench -p capt-clip` (ViT-B/16 random
        # weights, 2 threads or $RAYON_NUM_THREADS), to compare both on the same machine at
        # the same time
Generated with torch 2.15.0, transformers 5.24.0, open_clip_torch 3.3.0.
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

SEED = 20240531
VOCAB = 600  # reduced vocab; SOT/EOT are the two highest ids so EOT pooling by argmax works as in CLIP
SOT, EOT = VOCAB - 2, VOCAB - 1
CTX = 77
N_CTX = 4  # prompt slots
N_VPROMPT = 3  # visual prompt tokens


def tiny_config():
    # Text tower uses exact-erf "gelu", vision tower "quick_gelu": one fixture covers both activations.
    return CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CTX,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=SOT,
            eos_token_id=EOT,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            num_channels=3,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        projection_dim=24,
        logit_scale_init_value=2.6592,
        attn_implementation="sdpa",  # eager runs softmax in f32 even for f64 models
    )


def randomize(model):
    # HF init leaves LayerNorms at 1/0 and biases at 0; perturb everything so every tensor matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in**0.5)


def openai_state_dict(m):
    """HF CLIPModel -> OpenAI CLIP / open_clip state-dict names."""
    sd = {}
    t, v = m.text_model, m.vision_model

    def blocks(prefix, layers):
        for i, layer in enumerate(layers):
            a = layer.self_attn
            p = f"{prefix}transformer.resblocks.{i}."
            sd[p + "attn.in_proj_weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0)
            sd[p + "attn.in_proj_bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], 0)
            sd[p + "attn.out_proj.weight"] = a.out_proj.weight
            sd[p + "attn.out_proj.bias"] = a.out_proj.bias
            sd[p + "ln_1.weight"] = layer.layer_norm1.weight
            sd[p + "ln_1.bias"] = layer.layer_norm1.bias
            sd[p + "ln_2.weight"] = layer.layer_norm2.weight
            sd[p + "ln_2.bias"] = layer.layer_norm2.bias
            sd[p + "mlp.c_fc.weight"] = layer.mlp.fc1.weight
            sd[p + "mlp.c_fc.bias"] = layer.mlp.fc1.bias
            sd[p + "mlp.c_proj.weight"] = layer.mlp.fc2.weight
            sd[p + "mlp.c_proj.bias"] = layer.mlp.fc2.bias

    sd["token_embedding.weight"] = t.embeddings.token_embedding.weight
    sd["positional_embedding"] = t.embeddings.position_embedding.weight
    blocks("", t.encoder.layers)
    sd["ln_final.weight"] = t.final_layer_norm.weight
    sd["ln_final.bias"] = t.final_layer_norm.bias
    sd["text_projection"] = m.text_projection.weight.t()  # OpenAI: x @ text_projection
    sd["logit_scale"] = m.logit_scale
    sd["visual.class_embedding"] = v.embeddings.class_embedding
    sd["visual.positional_embedding"] = v.embeddings.position_embedding.weight
    sd["visual.conv1.weight"] = v.embeddings.patch_embedding.weight
    sd["visual.ln_pre.weight"] = v.pre_layrnorm.weight
    sd["visual.ln_pre.bias"] = v.pre_layrnorm.bias
    blocks("visual.", v.encoder.layers)
    sd["visual.ln_post.weight"] = v.post_layernorm.weight
    sd["visual.ln_post.bias"] = v.post_layernorm.bias
    sd["visual.proj"] = m.visual_projection.weight.t()
    return {k: x.detach().float().contiguous().clone() for k, x in sd.items()}


def causal_mask(n, dtype):
    mask = torch.full((n, n), float("-inf"), dtype=dtype).triu(1)
    return mask[None, None]


def text_from_embeds(m, embeds, eot, deep=None):
    """HF text tower on input embeddings; deep[k] replaces slots 1..=n before layer k+1."""
    t = m.text_model
    h = t.embeddings(inputs_embeds=embeds)
    mask = causal_mask(h.shape[1], h.dtype)
    for i, layer in enumerate(t.encoder.layers):
        if deep is not None and 1 <= i <= len(deep):
            p = deep[i - 1]
            n = p.shape[-2]
            p = p.expand(h.shape[0], -1, -1)
            h = torch.cat([h[:, :1], p, h[:, 1 + n :]], 1)
        h = layer(h, mask)
    h = t.final_layer_norm(h)
    pooled = h[torch.arange(h.shape[0]), eot]
    return m.text_projection(pooled)


def vision_with_prompts(m, pixels, prompts=None):
    """HF vision tower; prompts[0] appended after the patch tokens (before pre_layrnorm), prompts[k]
    replaces them before layer k. Returns (global, local) projected features."""
    v = m.vision_model
    h = v.embeddings(pixels)
    n_tok = h.shape[1]
    if prompts is not None:
        h = torch.cat([h, prompts[0].expand(h.shape[0], -1, -1)], 1)
    h = v.pre_layrnorm(h)
    for i, layer in enumerate(v.encoder.layers):
        if prompts is not None and 1 <= i < len(prompts):
            h = torch.cat([h[:, :n_tok], prompts[i].expand(h.shape[0], -1, -1)], 1)
        h = layer(h, None)
    glob = m.visual_projection(v.post_layernorm(h[:, 0]))
    local = m.visual_projection(v.post_layernorm(h[:, 1:n_tok]))
    return glob, local


def splice(m, ctx, ids):
    """[SOT] ctx tokens(...) [EOT] pad, shifted right by n; truncated at len(ids) keeping EOT."""
    emb = m.text_model.embeddings.token_embedding
    n, L = ctx.shape[-2], ids.shape[1]
    rows, eots = [], []
    for c in range(ids.shape[0]):
        row = ids[c].tolist()
        e = row.index(EOT)
        keep = row[1 : L - n] if e + n <= L - 1 else row[1 : L - n - 1] + [EOT]
        tok = emb(torch.tensor([row[0]] + keep))
        cc = ctx if ctx.dim() == 2 else ctx[c]
        rows.append(torch.cat([tok[:1], cc, tok[1:]], 0))
        eots.append(min(e + n, L - 1))
    return torch.stack(rows), torch.tensor(eots)


def id_rows(lengths, g):
    rows = []
    for n_tok in lengths:
        r = [SOT] + torch.randint(1, SOT, (n_tok,), generator=g).tolist() + [EOT]
        rows.append(r + [0] * (CTX - len(r)))
    return torch.tensor(rows, dtype=torch.long)


def check_open_clip(m, oa, ids, pixels):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    tc, vc = m.config.text_config, m.config.vision_config
    oc = open_clip.model.CLIP(
        embed_dim=m.config.projection_dim,
        vision_cfg=CLIPVisionCfg(
            layers=vc.num_hidden_layers,
            width=vc.hidden_size,
            head_width=vc.hidden_size // vc.num_attention_heads,
            mlp_ratio=vc.intermediate_size / vc.hidden_size,
            patch_size=vc.patch_size,
            image_size=vc.image_size,
        ),
        text_cfg=CLIPTextCfg(
            context_length=CTX,
            vocab_size=VOCAB,
            width=tc.hidden_size,
            heads=tc.num_attention_heads,
            layers=tc.num_hidden_layers,
            mlp_ratio=tc.intermediate_size / tc.hidden_size,
        ),
        quick_gelu=True,
    )
    for blk in oc.transformer.resblocks:  # text tower of the fixture uses exact GELU
        blk.mlp.gelu = torch.nn.GELU()
    missing, unexpected = oc.load_state_dict(oa, strict=False)
    assert not unexpected and all("attn_mask" in k for k in missing), (missing, unexpected)
    oc = oc.double().eval()
    with torch.no_grad():
        ti = oc.encode_text(ids)
        im = oc.encode_image(pixels.double())
    return ti, im


def bench_torch(cases):
    """Median ms of HF CLIP ViT-B/16 (random init) towers + projections in PyTorch eager."""
    import time

    torch.set_num_threads(int(os.environ.get("RAYON_NUM_THREADS", "2")))  # same knob as candle
    torch.manual_seed(0)
    cfg = CLIPConfig(vision_config=dict(patch_size=16), attn_implementation="sdpa")
    m = CLIPModel(cfg).eval()
    ids = torch.zeros(100, 77, dtype=torch.long)
    ids[:, 0] = 49406
    ids[:, 1:20] = torch.randint(1, 49000, (100, 19))
    ids[:, 20] = 49407
    runs = {"image1": (torch.randn(1, 3, 224, 224), 15), "image8": (torch.randn(8, 3, 224, 224), 5), "text": (ids, 5)}
    with torch.inference_mode():
        for case in cases:
            x, n = runs[case]
            if case == "text":
                f = lambda: m.text_projection(m.text_model(input_ids=x).pooler_output)  # noqa: E731
            else:
                f = lambda: m.visual_projection(m.vision_model(pixel_values=x).pooler_output)  # noqa: E731
            f()
            ts = []
            cpu0 = time.process_time()
            for _ in range(n):
                t = time.perf_counter()
                f()
                ts.append((time.perf_counter() - t) * 1e3)
            cpu = (time.process_time() - cpu0) * 1e3 / n
            print(f"torch eager {case}: median {sorted(ts)[len(ts) // 2]:.1f} ms, cpu {cpu:.0f} ms/run")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "clip"))
    ap.add_argument("--bench-torch", default=None, help="comma-separated cases: image1,image8,text")
    args = ap.parse_args()
    if args.bench_torch:
        bench_torch(args.bench_torch.split(","))
        return
    out = os.path.abspath(args.out)
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)

    model = CLIPModel(tiny_config()).eval()
    randomize(model)
    for d in ("tiny-hf", "tiny-openai"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    model.save_pretrained(os.path.join(out, "tiny-hf"), safe_serialization=True)
    oa = openai_state_dict(model)
    save_file(oa, os.path.join(out, "tiny-openai", "model.safetensors"))

    m = model.double()
    tc, vc = m.config.text_config, m.config.vision_config
    ids = id_rows([3, 10, 0, CTX - 2], g)  # last row fills all 77 slots
    # f32-representable so the stored f32 pixels are exactly the reference input
    pixels = torch.randn(3, 3, vc.image_size, vc.image_size, generator=g).double()

    ref = {}
    with torch.no_grad():
        out_hf = m(input_ids=ids, pixel_values=pixels)
        text_embeds = m.text_projection(m.text_model(input_ids=ids).pooler_output)
        img_glob, img_local = vision_with_prompts(m, pixels)
        assert torch.allclose(img_glob, m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output))
        eot = ids.argmax(-1)
        manual = text_from_embeds(m, m.text_model.embeddings.token_embedding(ids), eot)
        assert torch.allclose(manual, text_embeds, atol=1e-12), "manual text path must equal HF"
        ti, im = check_open_clip(m, oa, ids, pixels)
        # Same f32-exact weights in f64 on both sides: agreement to f64 rounding.
        assert (ti - text_embeds).abs().max() < 1e-12 and (im - img_glob).abs().max() < 1e-12, "OpenAI map"
        print("open_clip vs HF max diff: text %.2e image %.2e" % ((ti - text_embeds).abs().max(), (im - img_glob).abs().max()))

        ref["text.input_ids"] = ids
        ref["text.embeds"] = text_embeds
        ref["image.pixels"] = pixels.float()
        ref["image.embeds"] = img_glob
        ref["image.local"] = img_local
        ref["logits_per_image"] = out_hf.logits_per_image
        ref["logit_scale"] = m.logit_scale.detach().clone()

        # Prompt paths. Class ids are tokenized "classname ." prompts; the last one is long enough that
        # splicing 4 context tokens truncates it (EOT kept at position 76).
        class_ids = id_rows([2, 5, CTX - 4], g)
        ctx = 0.5 * torch.randn(N_CTX, tc.hidden_size, generator=g, dtype=torch.float64)
        ctx_cs = 0.5 * torch.randn(3, N_CTX, tc.hidden_size, generator=g, dtype=torch.float64)
        deep = 0.5 * torch.randn(tc.num_hidden_layers - 1, N_CTX, tc.hidden_size, generator=g, dtype=torch.float64)
        emb, eots = splice(m, ctx, class_ids)
        emb_cs, eots_cs = splice(m, ctx_cs, class_ids)
        assert torch.equal(eots, eots_cs)
        ref["prompt.class_ids"] = class_ids
        ref["prompt.eot"] = eots
        ref["prompt.ctx"] = ctx
        ref["prompt.embeds"] = emb
        ref["prompt.out"] = text_from_embeds(m, emb, eots)
        ref["prompt.ctx_cs"] = ctx_cs
        ref["prompt.out_cs"] = text_from_embeds(m, emb_cs, eots)
        ref["prompt.deep"] = deep
        ref["prompt.out_deep"] = text_from_embeds(m, emb, eots, deep=list(deep))

        vp = 0.5 * torch.randn(vc.num_hidden_layers, N_VPROMPT, vc.hidden_size, generator=g, dtype=torch.float64)
        vg, vl = vision_with_prompts(m, pixels, list(vp))
        ref["vprompt.layers"] = vp
        ref["vprompt.global"] = vg
        ref["vprompt.local"] = vl

    ref = {k: (x.to(torch.int64) if not x.is_floating_point() else x).contiguous() for k, x in ref.items()}
    save_file(ref, os.path.join(out, "reference.safetensors"))
    write_openai_b16_config(os.path.join(out, "openai-clip-vit-base-patch16.config.json"))
    total = 0
    for root, _, files in os.walk(out):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


def write_openai_b16_config(path):
    # The hub file's layout: full `text_config`/`vision_config` dicts plus the legacy `*_config_dict`
    # overrides; only the fields CLIP uses are kept here (values as in openai/clip-vit-base-patch16).
    cfg = {
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": 512,
        "text_config": {
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "hidden_act": "quick_gelu",
            "hidden_size": 512,
            "intermediate_size": 2048,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": 8,
            "num_hidden_layers": 12,
            "pad_token_id": 1,
            "projection_dim": 512,
            "vocab_size": 49408,
        },
        "text_config_dict": {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_attention_heads": 8,
            "num_hidden_layers": 12,
            "projection_dim": 512,
        },
        "torch_dtype": "float32",
        "transformers_version": None,
        "vision_config": {
            "attention_dropout": 0.0,
            "hidden_act": "quick_gelu",
            "hidden_size": 768,
            "image_size": 224,
            "intermediate_size": 3072,
            "layer_norm_eps": 1e-05,
            "model_type": "clip_vision_model",
            "num_attention_heads": 12,
            "num_channels": 3,
            "num_hidden_layers": 12,
            "patch_size": 16,
            "projection_dim": 512,
        },
        "vision_config_dict": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "patch_size": 16,
            "projection_dim": 512,
        },
    }
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
