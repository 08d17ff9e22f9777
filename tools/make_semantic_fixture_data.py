#!/usr/bin/env python3
"""Builds tests/fixtures/coop_full/dtd/: a small DTD-10 in CoOp layout from ../shared/data/coop_full
(128 px images), for the tests that train on the semantic CLIP fixture (tests/fixtures/clip/semantic-64).

Per class the first TRAIN train, VAL val and TEST test entries of split_full_DescribableTextures.json,
in split order; images copied byte for byte; the split file keeps exactly those entries (labels 0..9).

Run from the repository root:
    python3 tools/make_semantic_fixture_data.py [--src ../shared/data/coop_full]
"""
import argparse
import json
import os
import shutil
from collections import defaultdict

PER_SPLIT = {"train": 16, "val": 2, "test": 8}
SPLIT = "split_full_DescribableTextures.json"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=os.path.join("..", "shared", "data", "coop_full"))
    ap.add_argument("--dst", default=os.path.join("tests", "fixtures", "coop_full"))
    args = ap.parse_args()
    src = os.path.join(args.src, "dtd")
    dst = os.path.join(args.dst, "dtd")
    split = json.load(open(os.path.join(src, SPLIT)))
    out = {}
    for part, k in PER_SPLIT.items():
        taken = defaultdict(int)
        rows = []
        for impath, label, name in split[part]:
            if taken[label] < k:
                taken[label] += 1
                rows.append([impath, label, name])
                to = os.path.join(dst, "images", impath)
                os.makedirs(os.path.dirname(to), exist_ok=True)
                shutil.copyfile(os.path.join(src, "images", impath), to)
        out[part] = rows
    with open(os.path.join(dst, SPLIT), "w") as f:
        json.dump(out, f, indent=4, separators=(",", ": "))
    print({p: len(v) for p, v in out.items()})


if __name__ == "__main__":
    main()
