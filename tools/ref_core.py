#!/usr/bin/env python3
"""Regenerates capt-core's parity fixtures under tests/fixtures/core/ from independent Python references.

What it writes:
  tokenizer_cases.json   ids from open_clip's SimpleTokenizer / open_clip.tokenize (the reference the Rust
                         tokenizer must equal) and from HF CLIPTokenizerFast (recorded where it differs).
  images/src/*           small real source images (JPEG, plus PNG-with-alpha, 16-bit PNG, WebP and BMP made
                         from real images with Pillow / zlib).
  images/ref/*.png       open_clip's eval transform up to the centre crop (Resize(224, bicubic) + CenterCrop(224)
                         + convert("RGB")) as lossless 8-bit RGB.
  images/reference.json  per image: source, PIL mode, size, and a few values of the normalised tensor.

Run (from the repository root, in the Python reference env; needs open_clip_torch 3.3, transformers 5.x,
torchvision, Pillow, numpy; no network):
    /work/venv/ref/bin/python tools/ref_core.py --data /work/shared/data --out tests/fixtures/core
CI does not run this; the Rust tests in crates/capt-core read the committed outputs.
"""

import argparse
import io
import json
import os
import struct
import zlib

import numpy as np
import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

CONTEXT = 77

# Awkward strings: each exercises one part of open_clip's cleaning (ftfy.fix_text, html.unescape twice,
# whitespace collapse, lower case) or of the pre-tokenizer regex / byte-level BPE.
TEXTS = [
    "a photo of a dog.",
    "A PHOTO OF A CAT",
    "Café crème brûlée",
    "naïve résumé façade",
    "Ångström über Straße",
    "e\u0301cole de\u0301composée",  # decomposed accents: NFC composes them
    "東京タワーの写真",
    "한국어 텍스트",
    "Ελληνικά ΟΔΟΣ",
    "Русский текст",
    "العربية",
    "हिन्दी भाषा",
    "a photo of a 🐶 and 🐱🐱",
    "👨\u200d👩\u200d👧 family",
    "it's a dog's life, isn't it? they'll've we're you'd I'm",
    "DON'T STOP — I'M HERE",
    "\u201ccurly quotes\u201d and \u2018single\u2019 quotes",
    "the \ufb01nest \ufb02owers",
    "\uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28\u3000\uff54\uff45\uff58\uff54 \uff11\uff12\uff13",
    "fish &amp; chips &quot;quoted&quot; &#39;apos&#39; &#x41;&#66; &nbsp;space",
    "double &amp;amp; escaped &amp;lt;tag&amp;gt;",
    "a < b &amp; c &gt; d",
    "&NTILDE; &eacute; &hellip;",
    "tabs\tand\nnewlines\r\n  and   spaces  \u00a0nbsp\u2003em",
    "   leading and trailing   ",
    "numbers 3.14159 and 1,000,000 and 2024-01-01",
    "model-T ford, type_a, x86_64, R2-D2",
    "!!!???...,,,;;; --- ***",
    "e-mail: someone@example.com https://example.org/path?q=1&x=2",
    "a photo of a {}.",
    "british_shorthair",
    "bell\x07 char\x00 null\x7f del",
    "\x1b[31mred\x1b[0m text",
    "\x93c1 quotes\x94",
    "\u0130stanbul",
    "",
    "   \t\n  ",
    "a photo of a " * 20,  # over-long: truncated, EOT kept in the last slot
    " ".join(["cat"] * 75),  # exactly fills 77 with SOT + EOT
    " ".join(["cat"] * 76),  # one too many: truncated
]

# Strings where open_clip's behaviour is deliberately not reproduced (see capt_core::tokenizer docs).
DIVERGENT = [
    "caf\u00c3\u00a9 mojibake",  # ftfy's fix_encoding (heuristic mojibake repair) is not implemented
    "<start_of_text> literal",  # open_clip turns this literal into SOT; capt never reads specials from text
]


def tokenizer_fixture(data):
    from transformers import CLIPTokenizerFast

    st = SimpleTokenizer()
    hf = CLIPTokenizerFast.from_pretrained(
        os.path.join(data, "clip_tokenizer", "hf_openai-clip-vit-base-patch32")
    )
    cases = []
    for text in TEXTS:
        ids = [st.sot_token_id] + st.encode(text) + [st.eot_token_id]
        padded = open_clip.tokenize([text], context_length=CONTEXT)[0].tolist()
        eot_pos = int(np.argmax(padded))
        assert padded[eot_pos] == st.eot_token_id
        assert all(v == 0 for v in padded[eot_pos + 1 :])
        hf_ids = hf(text)["input_ids"]
        case = {
            "text": text,
            "ids": ids,
            "tokenize77_prefix": padded[: eot_pos + 1],
            "eot_pos": eot_pos,
            "hf_equal": hf_ids == ids,
        }
        if hf_ids != ids:
            case["hf_ids"] = hf_ids
        cases.append(case)
    divergent = []
    for text in DIVERGENT:
        divergent.append(
            {"text": text, "open_clip_ids": [st.sot_token_id] + st.encode(text) + [st.eot_token_id]}
        )
    n_diff = sum(not c["hf_equal"] for c in cases)
    return {
        "about": "ids from open_clip 3.3 SimpleTokenizer (bpe_simple_vocab_16e6) with SOT/EOT; "
        "tokenize77_prefix is open_clip.tokenize(text, 77) up to and including EOT (the rest is 0). "
        "hf_ids: HF CLIPTokenizerFast (openai/clip-vit-base-patch32 tokenizer.json) where it differs; HF "
        "skips ftfy and html unescaping, so it differs on curly quotes, ligatures, fullwidth forms, html "
        "entities and control characters. Regenerate with tools/ref_core.py.",
        "sot": st.sot_token_id,
        "eot": st.eot_token_id,
        "vocab_size": st.vocab_size,
        "context_length": CONTEXT,
        "hf_differs_on": n_diff,
        "cases": cases,
        "not_reproduced": divergent,
    }


# ---------------------------------------------------------------- images

IMAGES = [
    # name, dataset path (relative to data/), how to derive the fixture file
    ("caltech_gray_wrench", "coop_data/caltech-101/101_ObjectCategories/wrench/image_0009.jpg", "copy"),
    ("eurosat_tiny", "coop_data/eurosat/2750/AnnualCrop/AnnualCrop_1004.jpg", "copy"),
    ("pets_pug_portrait", "coop_data/oxford_pets/images/pug_166.jpg", "copy"),
    ("imagenet_mobile_home", "imagenet_samples/images/n03776460_mobile_home.JPEG", "copy"),
    ("imagenet_gown_portrait", "imagenet_samples/images/n02669723_academic_gown.JPEG", "copy"),
    ("dtd_chequered_2x_down", "coop_data/dtd/images/chequered/chequered_0138.jpg", "copy"),
    ("pets_alpha", "coop_data/oxford_pets/images/chihuahua_122.jpg", "png_alpha"),
    ("imagenet_rgb16", "imagenet_samples/images/n03485407_hand-held_computer.JPEG", "png16"),
    ("dtd_webp", "coop_data/dtd/images/bubbly/bubbly_0159.jpg", "webp"),
    ("caltech_bmp", "coop_data/caltech-101/101_ObjectCategories/dolphin/image_0027.jpg", "bmp"),
]

# Positions (c, y, x) of the normalised 3x224x224 tensor recorded in reference.json.
PROBES = [(0, 0, 0), (1, 0, 223), (2, 223, 0), (0, 223, 223), (1, 112, 112), (2, 57, 190), (0, 190, 33), (1, 5, 150)]


def png16_bytes(rgb16):
    """16-bit RGB PNG written by hand (Pillow cannot save 16-bit RGB)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def derive(kind, src_path):
    """Returns (file extension, bytes) of the fixture image."""
    raw = open(src_path, "rb").read()
    if kind == "copy":
        return os.path.splitext(src_path)[1].lower(), raw
    im = Image.open(io.BytesIO(raw)).convert("RGB")
    buf = io.BytesIO()
    if kind == "png_alpha":
        # Alpha ramps 0..255 left to right with a fully transparent block; the colour under transparent
        # pixels is kept, so a resize that does not premultiply alpha (as Pillow does) gives other values.
        a = np.array(im)
        h, w, _ = a.shape
        alpha = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
        alpha[h // 4 : h // 2, w // 3 : w // 2] = 0
        Image.fromarray(np.dstack([a, alpha]), "RGBA").save(buf, "PNG", optimize=True)
        return ".png", buf.getvalue()
    if kind == "png16":
        a = np.array(im).astype(np.uint32)
        h, w, _ = a.shape
        yy, xx = np.mgrid[0:h, 0:w]
        low = ((xx * 37 + yy * 11)[..., None] + np.arange(3) * 85) % 256  # deterministic sub-8-bit detail
        rgb16 = (a * 256 + low).astype(np.uint16)
        return ".png", png16_bytes(rgb16)
    if kind == "webp":
        im.save(buf, "WEBP", quality=85, method=4)
        return ".webp", buf.getvalue()
    if kind == "bmp":
        im.save(buf, "BMP")
        return ".bmp", buf.getvalue()
    raise ValueError(kind)


def images_fixture(data, out):
    tf = open_clip.image_transform(224, is_train=False)
    to_crop = tf.transforms[:3]  # Resize, CenterCrop, MaybeConvertMode
    src_dir = os.path.join(out, "images", "src")
    ref_dir = os.path.join(out, "images", "ref")
    os.makedirs(src_dir, exist_ok=True)
    os.makedirs(ref_dir, exist_ok=True)
    entries = []
    for name, rel, kind in IMAGES:
        ext, blob = derive(kind, os.path.join(data, rel))
        fname = name + ext
        with open(os.path.join(src_dir, fname), "wb") as f:
            f.write(blob)
        im = Image.open(io.BytesIO(blob))
        mode, size = im.mode, im.size
        crop = im
        for t in to_crop:
            crop = t(crop)
        assert crop.mode == "RGB" and crop.size == (224, 224)
        crop.save(os.path.join(ref_dir, name + ".png"), "PNG", optimize=True)
        full = tf(Image.open(io.BytesIO(blob)))
        # The stored uint8 crop must reproduce the reference tensor exactly (ToTensor + Normalize).
        again = crop
        for t in tf.transforms[3:]:
            again = t(again)
        assert torch.equal(full, again), name
        entries.append(
            {
                "name": name,
                "file": "src/" + fname,
                "ref": "ref/" + name + ".png",
                "origin": rel,
                "derived": kind,
                "pil_mode": mode,
                "width": size[0],
                "height": size[1],
                "probes": [[c, y, x, float(full[c, y, x])] for c, y, x in PROBES],
                "channel_means": [float(full[c].mean()) for c in range(3)],
            }
        )
        print(f"{fname}: {mode} {size[0]}x{size[1]} {len(blob)} bytes")
    return {
        "about": "open_clip.image_transform(224, is_train=False) on the PIL image as opened: "
        + repr(tf).replace("\n", " ")
        + ". ref/*.png is the 8-bit RGB result before ToTensor; probes are [c, y, x, value] of the "
        "normalised tensor. Regenerate with tools/ref_core.py.",
        "images": entries,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--out", default="tests/fixtures/core")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tok = tokenizer_fixture(args.data)
    with open(os.path.join(args.out, "tokenizer_cases.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, indent=1)
    print(f"tokenizer: {len(tok['cases'])} cases, HF differs on {tok['hf_differs_on']}")
    img = images_fixture(args.data, args.out)
    with open(os.path.join(args.out, "images", "reference.json"), "w") as f:
        json.dump(img, f, indent=1)


if __name__ == "__main__":
    main()
