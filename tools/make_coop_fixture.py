#!/usr/bin/env python3
"""Builds tests/fixtures/coop/ (small CoOp-layout datasets for the capt-data tests) from the
real data in ../shared/data/coop_data.

Run from the repository root:
    python3 tools/make_coop_fixture.py [--src ../shared/data/coop_data]
Then regenerate the few-shot reference: python3 tools/ref_fewshot.py

What it writes (images are copied byte for byte, never re-encoded):
- dtd/: the first 10 DTD classes, per class the 2 smallest train, 1 smallest val and
  2 smallest test images of the shipped mini split, listed in split_zhou order, and
  split_zhou_DescribableTextures.json holding exactly those entries (original labels 0..9).
- eurosat/: the 4 shipped EuroSAT images and their split (split_mini_EuroSAT.json).
"""
import argparse
import json
import os
import shutil
from collections import defaultdict

PER_SPLIT = {"train": 2, "val": 1, "test": 2}


def write_json(obj, path):
    # Dassl's write_json layout.
    with open(path, "w") as f:
        json.dump(obj, f, indent=4, separators=(",", ": "))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=os.path.join("..", "shared", "data", "coop_data"))
    ap.add_argument("--dst", default=os.path.join("tests", "fixtures", "coop"))
    args = ap.parse_args()

    # DTD: smallest files per (class, split) from the manifest, kept in split-file order.
    manifest = [json.loads(l) for l in open(os.path.join(args.src, "dtd", "manifest.jsonl"))]
    by_key = defaultdict(list)
    for row in manifest:
        by_key[(row["split"], row["label"])].append(row)
    keep = set()
    for (split, _label), rows in by_key.items():
        rows.sort(key=lambda r: (r["bytes"], r["impath"]))
        keep.update((split, r["impath"]) for r in rows[: PER_SPLIT[split]])
    full = json.load(open(os.path.join(args.src, "dtd", "split_zhou_DescribableTextures.json")))
    out = {s: [e for e in full[s] if (s, e[0]) in keep] for s in ("train", "val", "test")}
    dtd = os.path.join(args.dst, "dtd")
    for split in out.values():
        for impath, _, _ in split:
            dst = os.path.join(dtd, "images", impath)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(args.src, "dtd", "images", impath), dst)
    write_json(out, os.path.join(dtd, "split_zhou_DescribableTextures.json"))

    # EuroSAT: everything shipped.
    mini = json.load(open(os.path.join(args.src, "eurosat", "split_mini_EuroSAT.json")))
    eu = os.path.join(args.dst, "eurosat")
    for split in mini.values():
        for impath, _, _ in split:
            dst = os.path.join(eu, "2750", impath)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(args.src, "eurosat", "2750", impath), dst)
    write_json(mini, os.path.join(eu, "split_zhou_EuroSAT.json"))
    print({k: len(v) for k, v in out.items()}, {k: len(v) for k, v in mini.items()})


if __name__ == "__main__":
    main()
