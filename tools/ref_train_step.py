#!/usr/bin/env python3
"""PyTorch eager reference for `capt-train bench train-step`: one CoOp training step
(learned context -> frozen CLIP text encoder for every class -> logits against a batch of
cached image features -> cross-entropy + KgCoOp term -> backward -> SGD with momentum),
as CoOp's `PromptLearner` / `TextEncoder` do it, on a randomly initialised open_clip ViT-B/16
(or a tiny model of the same shape as `ClipConfig::tiny()`).

Prints one JSON line: ms/step with CoOp's full 77-token sequences and with sequences cut after
the longest EOT (what capt-train does; exact under the causal mask).

Run (2 threads, like the Rust bench):
    /work/venv/ref/bin/python tools/ref_train_step.py --classes 10 --steps 3
`capt-train bench train-step --torch /work/venv/ref/bin/python` runs it for each class count
and prints the candle/torch ratio (with `--device cuda` both run on the GPU: tools/gpu-check.sh).
Not run by CI.

The model comes from open_clip when it is installed, else from transformers (`CLIPModel`
with ViT-B/16's text tower; same architecture, same random-init shapes) and the CLIP BPE that
capt-core bundles: a GPU machine with PyTorch usually has transformers, not open_clip.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def have_open_clip():
    try:
        import open_clip  # noqa: F401

        return True
    except ImportError:
        return False


class HFText(torch.nn.Module):
    """transformers' CLIP text tower behind open_clip's attribute names (the ones used here)."""

    def __init__(self, size):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        if size == "b16":
            cfg = CLIPTextConfig(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                                 num_hidden_layers=12, num_attention_heads=8,
                                 max_position_embeddings=77, projection_dim=512,
                                 hidden_act="quick_gelu")
        elif size == "tiny":
            cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=77, projection_dim=24,
                                 hidden_act="quick_gelu")
        else:
            raise SystemExit(f"--size {size!r}: expected b16 or tiny")
        m = CLIPTextModelWithProjection(cfg)
        self.m = m
        self.token_embedding = m.text_model.embeddings.token_embedding
        self.ln_final = m.text_model.final_layer_norm
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))

    # Properties, not copies: `.to(device, dtype)` replaces the tensors underneath.
    @property
    def positional_embedding(self):
        return self.m.text_model.embeddings.position_embedding.weight

    @property
    def text_projection(self):
        return self.m.text_projection.weight.t()

    def transformer(self, x, attn_mask):
        mask = attn_mask[None, None].to(x.dtype)
        for layer in self.m.text_model.encoder.layers:
            x = layer(x, attention_mask=None, causal_attention_mask=mask)
            x = x[0] if isinstance(x, tuple) else x
        return x

    def encode_text(self, tokens):
        n = tokens.shape[0]
        eot = tokens.argmax(dim=-1)
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        mask = torch.full((length, length), float("-inf"), device=x.device).triu_(1)
        x = self.ln_final(self.transformer(x, mask))
        return x[torch.arange(n, device=x.device), eot] @ self.text_projection


_BPE = None


def bundled_tokenizer():
    """transformers' CLIPTokenizer over OpenAI's merges file (crates/capt-core/assets): the
    vocabulary is the 256 byte symbols, the same with `</w>`, one entry per merge, then the
    two special tokens, as in OpenAI's tokenizer."""
    import gzip
    import json
    import os
    import tempfile

    from transformers import CLIPTokenizer

    # GPT-2's byte-to-symbol table: printable bytes map to themselves, the rest to 256+.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    here = os.path.dirname(os.path.abspath(__file__))
    gz = os.path.join(here, "..", "crates", "capt-core", "assets", "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = [table[b] for b in keep] + [table[b] for b in range(256) if b not in keep]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(tmp, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"))


def tokenize(texts, length=77):
    """open_clip.tokenize, or the CLIP BPE of the bundled tokenizer files."""
    if have_open_clip():
        import open_clip

        return open_clip.tokenize(texts)
    global _BPE
    if _BPE is None:
        _BPE = bundled_tokenizer()
    out = torch.zeros(len(texts), length, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = _BPE(t)["input_ids"][:length]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def build_model(size):
    if not have_open_clip():
        model = HFText(size)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    import open_clip

    if size == "b16":
        model = open_clip.create_model("ViT-B-16", pretrained=None)
    elif size == "tiny":
        cfg = dict(
            embed_dim=24,
            vision_cfg=dict(image_size=32, layers=2, width=48, patch_size=8, head_width=12),
            text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
        )
        model = open_clip.CLIP(**cfg)
    else:
        raise SystemExit(f"--size {size!r}: expected b16 or tiny")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def class_names(n):
    words = ["striped", "golden", "retriever", "maple", "leaf", "sports", "car", "banded", "tabby", "cat", "red", "fox"]
    return [f"{words[i % 12]} {words[(i // 12 + 3) % 12]} {i}" for i in range(n)]


class CoOp(torch.nn.Module):
    def __init__(self, clip, names, n_ctx, truncate, device):
        super().__init__()
        self.clip = clip
        prefix = " ".join(["X"] * n_ctx)
        tokens = tokenize([f"{prefix} {n}." for n in names]).to(device)
        self.eot = tokens.argmax(dim=-1)
        if truncate:
            tokens = tokens[:, : int(self.eot.max()) + 1]
        with torch.no_grad():
            emb = clip.token_embedding(tokens)
        self.register_buffer("prefix", emb[:, :1])
        self.register_buffer("suffix", emb[:, 1 + n_ctx :])
        init = tokenize(["a photo of a"]).to(device)
        with torch.no_grad():
            ctx = clip.token_embedding(init)[0, 1 : 1 + n_ctx].clone()
        # The learned context stays f32 (as capt-train's); the frozen tower may be bf16.
        self.ctx = torch.nn.Parameter(ctx.float())
        self.length = tokens.shape[1]
        zs = tokenize([f"a photo of a {n}." for n in names]).to(device)
        with torch.no_grad():
            self.register_buffer("zs", F.normalize(clip.encode_text(zs), dim=-1))

    def text_features(self):
        c = self.prefix.shape[0]
        ctx = self.ctx.to(self.prefix.dtype).unsqueeze(0).expand(c, -1, -1)
        x = torch.cat([self.prefix, ctx, self.suffix], dim=1)
        x = x + self.clip.positional_embedding[: self.length]
        mask = torch.full((self.length, self.length), float("-inf"), device=x.device).triu_(1)
        x = self.clip.transformer(x, attn_mask=mask.to(x.dtype))
        x = self.clip.ln_final(x)
        x = x[torch.arange(c, device=x.device), self.eot] @ self.clip.text_projection
        return x.float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", default="b16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="f32", help="frozen tower dtype: f32, bf16 or f16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    clip = build_model(args.size).to(device=device, dtype=dtype)
    names = class_names(args.classes)
    out = {"classes": args.classes, "steps": args.steps, "size": args.size, "threads": args.threads,
           "device": str(device), "dtype": args.dtype,
           "model": "open_clip" if have_open_clip() else "transformers"}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for truncate, key in [(False, "ms_per_step_77"), (True, "ms_per_step_truncated")]:
        coop = CoOp(clip, names, 4, truncate, device)
        opt = torch.optim.SGD([coop.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
        d = coop.zs.shape[1]
        times = []
        for s in range(args.steps + 1):
            feats = torch.randn(args.batch, d, device=device)
            labels = (torch.arange(s * args.batch, (s + 1) * args.batch) % args.classes).to(device)
            sync()
            t0 = time.perf_counter()
            t = coop.text_features()
            logits = clip.logit_scale.float().exp() * F.normalize(feats, dim=-1) @ F.normalize(t, dim=-1).t()
            kg = (F.normalize(t, dim=-1) - coop.zs).pow(2).sum(-1).mean()
            loss = F.cross_entropy(logits, labels) + 8.0 * kg
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([coop.ctx], 1.0)
            opt.step()
            sync()
            if s > 0:
                times.append((time.perf_counter() - t0) * 1000.0)
        out[key] = statistics.mean(times)
        out[key.replace("ms_per_step", "median_ms")] = statistics.median(times)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
