#!/usr/bin/env python3
"""Pretrain a small CLIP whose features carry real classes (tests/fixtures/clip/semantic-64/).

No pretrained CLIP can be downloaded on the project's machines, so this makes one: a
transformers `CLIPModel` of the real architecture (pre-LN ViT, QuickGELU, EOT pooling,
projections, `logit_scale`, the real 49408-token CLIP BPE vocabulary) trained contrastively
on CPU from a fixed seed, on the **train and val** images of `shared/data/coop_full`
(Caltech101: 100 classes, DTD: 10 classes). Test images are never read.

Loss (UniCL-style): each image is scored against one caption per class of the joint
110-class space (a template drawn per class per step), so same-class images in a batch are
never negatives; plus the text-to-image direction over the batch with every same-class image
as a positive. Captions come from CoOp-style templates, several per class, so the text tower
is not tied to one sentence.

Images: decoded once at 80 px (shorter side, centre crop), then per step a random resized
crop (area 0.35-1, aspect 3/4-4/3) to 64 px + horizontal flip; evaluation (and capt's own
preprocessing) resizes the shorter side to 64 bicubic and centre-crops.

Run (from the repository root; CI never runs it, the output is committed):
    python3 -m venv /work/venv/pt
    /work/venv/pt/bin/pip install --no-deps torch==2.15.0
    /work/venv/pt/bin/pip install filelock typing-extensions sympy networkx jinja2 fsspec \
        transformers==5.23.0 safetensors pillow numpy
    OMP_NUM_THREADS=2 /work/venv/pt/bin/python tools/pretrain_clip.py \
        --data ../shared/data/coop_full --out tests/fixtures/clip/semantic-64 --epochs 25
The model card (README.md in the output folder) records the command, steps, wall time and
the zero-shot test accuracy this script measured; `capt-train zeroshot` gives the official one.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

# CoOp-style caption templates, shared by every class (the zero-shot templates capt uses,
# "a photo of a {}." and "{} texture.", are among them).
TEMPLATES = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of the {}.",
    "a good photo of a {}.",
    "a low resolution photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "{} texture.",
    "a photo of a {} texture.",
    "a {} pattern.",
    "a photo of a {} object.",
    "itap of a {}.",
]

DATASETS = [
    # (folder, split file, image dir, zero-shot template capt uses for it)
    ("caltech-101", "split_full_Caltech101.json", "101_ObjectCategories", "a photo of a {}."),
    ("dtd", "split_full_DescribableTextures.json", "images", "{} texture."),
]


def load_split(root: Path, splits):
    """Rows (path, global label, classname, dataset index) of the given splits, and the
    joint class list (Caltech101 classes first, then DTD's)."""
    rows, classnames, offsets = [], [], []
    for di, (folder, split_file, img_dir, _) in enumerate(DATASETS):
        split = json.loads((root / folder / split_file).read_text())
        names = {}
        for part in ("train", "val", "test"):
            for _, label, name in split[part]:
                names[label] = name
        offset = len(classnames)
        offsets.append(offset)
        classnames += [names[i] for i in range(len(names))]
        for part in splits:
            for rel, label, name in split[part]:
                rows.append((root / folder / img_dir / rel, offset + label, name, di))
    return rows, classnames, offsets


def decode(path: Path, size: int) -> np.ndarray:
    """Shorter side to `size` (bicubic), centre crop `size` x `size`, uint8 HWC."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def augment(x: torch.Tensor, out: int, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (area 0.35-1, aspect 3/4-4/3) + horizontal flip, batched through
    one affine grid."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(0.35, 1.0, generator=gen)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = logr.exp()
    sw = (area * ratio).sqrt().clamp(max=1.0)
    sh = (area / ratio).sqrt().clamp(max=1.0)
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sw)
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sh)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sw * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sh
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, (n, 3, out, out), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def tokenize(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def zero_shot(model, tok, images, labels, classnames, template, batch=256):
    model.eval()
    ids, mask = tokenize(tok, [template.format(c) for c in classnames])
    t = F.normalize(model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
    correct = 0
    for i in range(0, len(images), batch):
        x = normalise(to_tensor(images[i : i + batch]))
        f = F.normalize(model.get_image_features(pixel_values=x).pooler_output, dim=-1)
        correct += (f @ t.T).argmax(-1).eq(labels[i : i + batch]).sum().item()
    model.train()
    return 100.0 * correct / len(images)


def make_config(args, tok) -> CLIPConfig:
    text = dict(
        vocab_size=len(tok),
        hidden_size=args.text_width,
        intermediate_size=4 * args.text_width,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_width // 64,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=args.vision_width,
        intermediate_size=4 * args.vision_width,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_width // 64,
        image_size=args.image_size,
        patch_size=args.patch,
        hidden_act="quick_gelu",
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.embed_dim)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="coop_full root (caltech-101/, dtd/)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="HF CLIP tokenizer folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--vision-width", type=int, default=192)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-width", type=int, default=128)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--init", type=Path, default=None, help="continue from a model this script saved")
    args = ap.parse_args()

    t0 = time.time()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    tok_dir = args.tokenizer or args.data.parent / "clip_tokenizer" / "hf_openai-clip-vit-base-patch32"
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))

    train_rows, classnames, offsets = load_split(args.data, ("train", "val"))
    test_rows, _, _ = load_split(args.data, ("test",))
    stage = args.image_size + args.image_size // 4
    print(f"{len(train_rows)} train+val images, {len(classnames)} classes; decoding", flush=True)
    train_x = np.stack([decode(p, stage) for p, *_ in train_rows])
    train_y = torch.tensor([r[1] for r in train_rows])
    test_sets = []
    for di, (folder, _, _, template) in enumerate(DATASETS):
        rows = [r for r in test_rows if r[3] == di]
        lo = offsets[di]
        hi = offsets[di + 1] if di + 1 < len(offsets) else len(classnames)
        test_sets.append(
            (
                folder,
                np.stack([decode(p, args.image_size) for p, *_ in rows]),
                torch.tensor([r[1] - lo for r in rows]),
                classnames[lo:hi],
                template,
            )
        )
    print(f"decoded in {time.time() - t0:.0f} s", flush=True)

    # Every caption of every class, tokenised once; a step draws one template per class.
    caps = [[t.format(c) for t in TEMPLATES] for c in classnames]
    cap_ids, cap_mask = tokenize(tok, [s for per in caps for s in per])
    n_t = len(TEMPLATES)
    cut = int(cap_mask.sum(1).max())
    cap_ids, cap_mask = cap_ids[:, :cut], cap_mask[:, :cut]

    if args.init is not None:
        model = CLIPModel.from_pretrained(str(args.init)).float()
    else:
        model = CLIPModel(make_config(args, tok))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.1f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    steps_per_epoch = len(train_rows) // args.batch
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    history = []
    step = 0
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train_rows), generator=gen)
        run_loss, te = 0.0, time.time()
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch : (b + 1) * args.batch]
            x = normalise(augment(to_tensor(train_x[idx.numpy()]), args.image_size, gen))
            y = train_y[idx]
            pick = torch.randint(0, n_t, (len(classnames),), generator=gen)
            rows = torch.arange(len(classnames)) * n_t + pick
            f = F.normalize(model.get_image_features(pixel_values=x).pooler_output, dim=-1)
            t = F.normalize(model.get_text_features(input_ids=cap_ids[rows], attention_mask=cap_mask[rows]).pooler_output, dim=-1)
            scale = model.logit_scale.exp().clamp(max=100.0)
            logits = scale * f @ t.T  # images x all classes
            loss_i = F.cross_entropy(logits, y)
            # text -> image over the batch: every same-class image is a positive.
            present = y.unique()
            lt = logits[:, present].T  # present classes x images
            target = (y.unsqueeze(0) == present.unsqueeze(1)).float()
            target = target / target.sum(1, keepdim=True)
            loss_t = -(target * F.log_softmax(lt, dim=1)).sum(1).mean()
            loss = 0.5 * (loss_i + loss_t)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100.0))
            run_loss += loss.item()
            step += 1
        rec = {"epoch": epoch + 1, "loss": run_loss / steps_per_epoch, "epoch_s": round(time.time() - te, 1)}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            for name, xs, ys, names, template in test_sets:
                rec[f"zs_{name}"] = round(zero_shot(model, tok, xs, ys, names, template), 2)
        history.append(rec)
        print(json.dumps(rec), flush=True)

    wall = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.half().save_pretrained(str(args.out), safe_serialization=True)
    final = history[-1]
    card = {
        "command": " ".join(["python3", "tools/pretrain_clip.py"] + sys.argv[1:]),
        "torch": torch.__version__,
        "parameters": n_params,
        "train_images": len(train_rows),
        "classes": len(classnames),
        "steps": step,
        "wall_s": round(wall),
        "history": history,
    }
    (args.out / "pretrain.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps({k: final[k] for k in final if k.startswith("zs_")}), f"wall {wall:.0f} s", flush=True)


if __name__ == "__main__":
    main()
