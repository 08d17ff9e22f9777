#!/usr/bin/env python3
"""Builds the tiny CLIP-like classifier that the `capt-edge` tests run, in the exporter's model
directory layout, plus reference outputs computed with python onnxruntime.

The committed fixture lives in tests/fixtures/edge/ and is regenerated with

    /work/venv/ref/bin/python tools/gen_edge_fixture.py            # writes tests/fixtures/edge/

(torch, onnx, onnxruntime, numpy and pillow are needed; CI does not run this script). It writes:

    model/capt.json          manifest (format_version 1, the contract `capt_backend::Manifest` reads)
    model/classifier.onnx    pixel_values f32 [N,3,32,32] -> logits, probs f32 [N,5]; opset 17
    bad_io/classifier.onnx   a valid ONNX graph whose input/output names break the contract
    images/*.png|jpg         small test images
    reference.json           onnxruntime outputs for a synthetic batch and for the images

A ViT-B/16-sized random classifier (224 px, 12 layers of width 768, 100 classes; ~350 MB, NOT
committed) for benchmarks, with python onnxruntime and torch eager timings:

    /work/venv/ref/bin/python tools/gen_edge_fixture.py --vit-b16 /tmp/capt-vitb16 --bench

The synthetic input is defined exactly in f32 so Rust reproduces it bit for bit:
    x[i] = ((i * 7919) % 255) / 255 - 0.5   for the flat NCHW index i.
"""

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from PIL import Image

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
FIXTURE_CLASSES = ["cat", "dog", "sea turtle", "fire truck", "maple leaf"]


class Block(nn.Module):
    """Pre-LN transformer block as in CLIP's vision tower (QuickGELU MLP)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x):
        n, t, w = x.shape
        hd = w // self.heads
        q, k, v = self.qkv(self.ln_1(x)).chunk(3, dim=-1)
        q = q.reshape(n, t, self.heads, hd).transpose(1, 2)
        k = k.reshape(n, t, self.heads, hd).transpose(1, 2)
        v = v.reshape(n, t, self.heads, hd).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) * (hd ** -0.5)
        a = (att.softmax(-1) @ v).transpose(1, 2).reshape(n, t, w)
        x = x + self.out(a)
        h = self.fc(self.ln_2(x))
        h = h * torch.sigmoid(1.702 * h)
        return x + self.proj(h)


class TinyClipClassifier(nn.Module):
    """Image tower + projection + fixed normalised class embeddings + softmax: the graph shape
    of the exporter's `classifier.onnx` (a zero-shot/CoOp classifier with baked text features)."""

    def __init__(self, size, patch, width, layers, heads, dim, classes, logit_scale=100.0):
        super().__init__()
        grid = size // patch
        self.conv = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.pos = nn.Parameter(torch.randn(grid * grid + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, dim) * width ** -0.5)
        text = torch.randn(classes, dim)
        self.register_buffer("text", text / text.norm(dim=-1, keepdim=True))
        self.scale = logit_scale

    def forward(self, pixel_values):
        x = self.conv(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.pos)
        for blk in self.blocks:
            x = blk(x)
        f = self.ln_post(x[:, 0]) @ self.proj
        f = f / f.norm(dim=-1, keepdim=True)
        logits = self.scale * f @ self.text.t()
        return logits, logits.softmax(-1)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_hash(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().astype(np.float32).tobytes())
    return h.hexdigest()


def export(model, path, size):
    model.eval()
    dummy = torch.zeros(2, 3, size, size)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["pixel_values"],
        output_names=["logits", "probs"],
        dynamic_axes={"pixel_values": {0: "N"}, "logits": {0: "N"}, "probs": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def write_manifest(out_dir, model, classes, size, method, model_name):
    preprocess = {
        "resize_shorter": size,
        "crop": size,
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
        "interpolation": "bicubic",
    }
    sh = state_hash(model)
    manifest = {
        "format_version": 1,
        "model_name": model_name,
        "class_names": classes,
        "embedding_dim": model.proj.shape[1],
        "preprocess": preprocess,
        "method": method,
        "files": {
            "classifier": {"path": "classifier.onnx", "sha256": sha256_file(out_dir / "classifier.onnx")},
        },
        "source_checkpoint_sha256": sh,
        "backbone_sha256": sh,
        "created_by": "tools/gen_edge_fixture.py",
    }
    (out_dir / "capt.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def synthetic_input(n, size):
    i = np.arange(n * 3 * size * size, dtype=np.int64)
    x = ((i * 7919) % 255).astype(np.float32) / np.float32(255.0) - np.float32(0.5)
    return x.reshape(n, 3, size, size)


def clip_preprocess(img, size):
    """open_clip's eval transform on PIL: Resize(size, bicubic) + CenterCrop + Normalize."""
    img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left = int(round((nw - size) / 2.0))
    top = int(round((nh - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = (a - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return a.transpose(2, 0, 1)[None].astype(np.float32)


def make_images(img_dir, size):
    """Small deterministic images: two at exactly the crop size (PNG) and two that go through
    resize + crop (JPEG, PNG). capt-core reproduces Pillow's decode and bicubic resize, so Rust
    matches these references to float rounding."""
    img_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a = np.stack([xx / size * 255, yy / size * 255, np.full_like(xx, 128)], -1).astype(np.uint8)
    Image.fromarray(a).save(img_dir / "gradient_32.png")
    rng = np.random.default_rng(7)
    b = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(b).save(img_dir / "noise_32.png")
    yy, xx = np.mgrid[0:40, 0:48].astype(np.float32)
    c = np.stack([(np.sin(xx / 5) * 0.5 + 0.5) * 255, yy / 40 * 255, (xx + yy) / 88 * 255], -1)
    Image.fromarray(c.astype(np.uint8)).save(img_dir / "waves_48x40.jpg", quality=90)
    yy, xx = np.mgrid[0:64, 0:48].astype(np.float32)
    d = np.stack([((xx // 8 + yy // 8) % 2) * 255, np.full_like(xx, 60), yy / 64 * 255], -1)
    Image.fromarray(d.astype(np.uint8)).save(img_dir / "checker_48x64.png")
    return ["gradient_32.png", "noise_32.png", "waves_48x40.jpg", "checker_48x64.png"]


def write_bad_io(path):
    """Valid ONNX whose names break the contract (input `x`, outputs `y`, `z`)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 5])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [0, -1])
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["y"]),
        helper.make_node("Softmax", ["y"], ["z"], axis=-1),
    ]
    inits = [
        shape,
        helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor("ends", TensorProto.INT64, [1], [5]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(nodes, "bad_io", [x], [y, z], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def gen_fixture(root):
    torch.manual_seed(0)
    size = 32
    model = TinyClipClassifier(size, patch=8, width=48, layers=2, heads=4, dim=32, classes=len(FIXTURE_CLASSES))
    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    export(model, model_dir / "classifier.onnx", size)
    manifest = write_manifest(model_dir, model, FIXTURE_CLASSES, size, "zeroshot", "capt-edge-fixture-tiny")
    write_bad_io(root / "bad_io" / "classifier.onnx")
    names = make_images(root / "images", size)

    sess = ort.InferenceSession(str(model_dir / "classifier.onnx"), providers=["CPUExecutionProvider"])
    x = synthetic_input(3, size)
    logits, probs = sess.run(["logits", "probs"], {"pixel_values": x})
    with torch.no_grad():
        tl, _ = model(torch.from_numpy(x))
    print("torch vs onnxruntime max |logit diff|:", float(np.abs(tl.numpy() - logits).max()))
    images = []
    for name in names:
        pv = clip_preprocess(Image.open(root / "images" / name), size)
        l, p = sess.run(["logits", "probs"], {"pixel_values": pv})
        images.append({"file": name, "logits": l[0].tolist(), "probs": p[0].tolist(), "top1": int(p[0].argmax())})
    ref = {
        "generator": "tools/gen_edge_fixture.py",
        "onnxruntime": ort.__version__,
        "synthetic": {"n": 3, "formula": "((i*7919)%255)/255-0.5", "logits": logits.tolist(),
                      "probs": probs.tolist()},
        "images": images,
    }
    (root / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"wrote {root} ({total} bytes); classifier sha256 {manifest['files']['classifier']['sha256']}")


def time_ms(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1000)
    return statistics.median(ts)


def gen_vit_b16(out_dir, bench, threads):
    torch.manual_seed(0)
    classes = [f"class {i}" for i in range(100)]
    model = TinyClipClassifier(224, patch=16, width=768, layers=12, heads=12, dim=512, classes=len(classes))
    out_dir.mkdir(parents=True, exist_ok=True)
    export(model, out_dir / "classifier.onnx", 224)
    write_manifest(out_dir, model, classes, 224, "zeroshot", "random-vit-b16")
    print(f"wrote {out_dir}")
    if not bench:
        return
    torch.set_num_threads(threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(out_dir / "classifier.onnx"), so, providers=["CPUExecutionProvider"])
    for n, reps in [(1, 15), (8, 5)]:
        x = synthetic_input(n, 224)
        ms = time_ms(lambda: sess.run(["probs"], {"pixel_values": x}), reps)
        with torch.inference_mode():
            tms = time_ms(lambda: model(torch.from_numpy(x)), reps)
        print(f"b{n}: python onnxruntime {ms:.1f} ms, torch eager {tms:.1f} ms ({threads} threads)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests/fixtures/edge")
    ap.add_argument("--vit-b16", type=Path, help="write a ViT-B/16-sized random classifier here instead")
    ap.add_argument("--bench", action="store_true", help="with --vit-b16: time python onnxruntime and torch")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.vit_b16:
        gen_vit_b16(args.vit_b16, args.bench, args.threads)
    else:
        gen_fixture(args.out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
