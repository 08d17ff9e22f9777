#!/usr/bin/env python3
"""Export benchmark helpers (issue "capt-export"): a random ViT-B/16 CLIP in HF format, and
python onnxruntime timings of capt's exported graphs next to the bare CLIP image encoder
exported from PyTorch (the anchor the CAPT head's cost is measured against).

    python tools/bench_export.py make-b16 DIR
        # random openai/clip-vit-base-patch16-shaped CLIPModel (seed 0), save_pretrained (safetensors)
    python tools/bench_export.py time DIR_OF_EXPORT --backbone B16_DIR [--threads 2]
        # times classifier.onnx / image_encoder.onnx (capt-export) and the torch.onnx-exported
        # CLIPVisionModelWithProjection of the same weights, batch 1 and 8, in onnxruntime

Driven by tools/bench_export.sh. Needs torch, transformers, onnx, onnxruntime, numpy.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def make_b16(out: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, vocab_size=49408,
                         hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=16,
                           hidden_act="quick_gelu"),
        projection_dim=512,
    )
    model = CLIPModel(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    print(f"wrote {out}")


def timeit(sess, feeds, reps):
    sess.run(None, feeds)
    sess.run(None, feeds)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, feeds)
        ts.append((time.perf_counter() - t) * 1000)
    return statistics.median(ts)


def time_export(export: Path, backbone: Path, threads: int, reps: int) -> None:
    import onnxruntime as ort
    import torch
    from transformers import CLIPVisionModelWithProjection

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    anchor = export / "anchor_image_encoder.onnx"
    if not anchor.exists():
        m = CLIPVisionModelWithProjection.from_pretrained(backbone).eval()

        class Wrap(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m(pixel_values=x).image_embeds

        torch.onnx.export(Wrap(m), (torch.zeros(1, 3, 224, 224),), str(anchor),
                          input_names=["pixel_values"], output_names=["image_embeds"],
                          dynamic_axes={"pixel_values": {0: "N"}}, opset_version=17, dynamo=False)
    res = {}
    for name in ["anchor_image_encoder.onnx", "image_encoder.onnx", "classifier.onnx"]:
        sess = ort.InferenceSession(str(export / name), opts, providers=["CPUExecutionProvider"])
        for b in (1, 8):
            x = np.random.default_rng(0).standard_normal((b, 3, 224, 224)).astype(np.float32)
            res[f"{name} b{b}"] = timeit(sess, {"pixel_values": x}, reps if b == 1 else max(3, reps // 3))
    # PyTorch eager anchor: the bare HF image encoder, same threads, inference mode.
    torch.set_num_threads(threads)
    m = CLIPVisionModelWithProjection.from_pretrained(backbone).eval()
    for b in (1, 8):
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((b, 3, 224, 224)).astype(np.float32))
        with torch.inference_mode():
            for _ in range(2):
                m(pixel_values=x)
            ts = []
            for _ in range(reps if b == 1 else max(3, reps // 3)):
                t = time.perf_counter()
                m(pixel_values=x)
                ts.append((time.perf_counter() - t) * 1000)
        res[f"torch eager image encoder b{b}"] = statistics.median(ts)
    for k, v in res.items():
        print(f"{k:<36} {v:8.1f} ms")
    for b in (1, 8):
        a = res[f"anchor_image_encoder.onnx b{b}"]
        c = res[f"classifier.onnx b{b}"]
        e = res[f"image_encoder.onnx b{b}"]
        print(f"b{b}: classifier / torch-exported encoder = {c / a:.3f}x; "
              f"classifier / capt image_encoder = {c / e:.3f}x (head cost {100 * (c - e) / e:+.1f} %)")
    print(json.dumps(res))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-b16")
    m.add_argument("out", type=Path)
    t = sub.add_parser("time")
    t.add_argument("export", type=Path)
    t.add_argument("--backbone", type=Path, required=True)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    if a.cmd == "make-b16":
        make_b16(a.out)
    else:
        time_export(a.export, a.backbone, a.threads, a.reps)


if __name__ == "__main__":
    main()
