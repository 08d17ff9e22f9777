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
and prints the candle/torch ratio. Not run by CI.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def build_model(size):
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
    def __init__(self, clip, names, n_ctx, truncate):
        super().__init__()
        import open_clip

        self.clip = clip
        prefix = " ".join(["X"] * n_ctx)
        tokens = open_clip.tokenize([f"{prefix} {n}." for n in names])
        self.eot = tokens.argmax(dim=-1)
        if truncate:
            tokens = tokens[:, : int(self.eot.max()) + 1]
        with torch.no_grad():
            emb = clip.token_embedding(tokens)
        self.register_buffer("prefix", emb[:, :1])
        self.register_buffer("suffix", emb[:, 1 + n_ctx :])
        init = open_clip.tokenize(["a photo of a"])
        with torch.no_grad():
            ctx = clip.token_embedding(init)[0, 1 : 1 + n_ctx].clone()
        self.ctx = torch.nn.Parameter(ctx)
        self.length = tokens.shape[1]
        zs = open_clip.tokenize([f"a photo of a {n}." for n in names])
        with torch.no_grad():
            self.register_buffer("zs", F.normalize(clip.encode_text(zs), dim=-1))

    def text_features(self):
        c = self.prefix.shape[0]
        x = torch.cat([self.prefix, self.ctx.unsqueeze(0).expand(c, -1, -1), self.suffix], dim=1)
        x = x + self.clip.positional_embedding[: self.length]
        mask = torch.full((self.length, self.length), float("-inf")).triu_(1)
        x = self.clip.transformer(x, attn_mask=mask)
        x = self.clip.ln_final(x)
        x = x[torch.arange(c), self.eot] @ self.clip.text_projection
        return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", default="b16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clip = build_model(args.size)
    names = class_names(args.classes)
    out = {"classes": args.classes, "steps": args.steps, "size": args.size, "threads": args.threads}
    for truncate, key in [(False, "ms_per_step_77"), (True, "ms_per_step_truncated")]:
        coop = CoOp(clip, names, 4, truncate)
        opt = torch.optim.SGD([coop.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
        d = coop.zs.shape[1]
        times = []
        for s in range(args.steps + 1):
            feats = torch.randn(args.batch, d)
            labels = torch.arange(s * args.batch, (s + 1) * args.batch) % args.classes
            t0 = time.perf_counter()
            t = coop.text_features()
            logits = clip.logit_scale.exp() * F.normalize(feats, dim=-1) @ F.normalize(t, dim=-1).t()
            kg = (F.normalize(t, dim=-1) - coop.zs).pow(2).sum(-1).mean()
            loss = F.cross_entropy(logits, labels) + 8.0 * kg
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([coop.ctx], 1.0)
            opt.step()
            if s > 0:
                times.append((time.perf_counter() - t0) * 1000.0)
        out[key] = statistics.mean(times)
        out[key.replace("ms_per_step", "median_ms")] = statistics.median(times)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
