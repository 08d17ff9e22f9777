#!/usr/bin/env python3
"""Reference few-shot and base/new subsets computed with Python's own `random`, following
CoOp/Dassl: random.seed(seed); for train then val (min(shots, 4)), group items by label in
first-appearance order and take random.sample(items, shots) per group (all items when a
group is smaller); then the base/new split on the sorted few-shot train labels
(first ceil(C/2) are base), every split relabelled from 0.

Run from the repository root (plain python3 >= 3.8, no packages needed):
    python3 tools/ref_fewshot.py [--data ../shared/data/coop_data]
It writes tests/fixtures/coop/fewshot_reference.json, which the capt-data tests compare
against bit for bit:
- "fixture": full lists for the DTD fixture in tests/fixtures/coop (always checked);
- "real": for the full split_zhou files in --data (checked when ../shared/data exists),
  the counts, the first entries and a sha256 of every list.
CI does not run this script; rerun it only when the fixture or split files change.
"""
import argparse
import hashlib
import json
import math
import os
import random
import sys

REAL = [
    ("oxford_pets", "OxfordPets"),
    ("dtd", "DescribableTextures"),
    ("eurosat", "EuroSAT"),
    ("caltech-101", "Caltech101"),
    ("ucf101", "UCF101"),
]
SHOTS = [1, 2, 4, 16]
SEEDS = [1, 2, 3]


def read_split(path):
    split = json.load(open(path))
    return {k: [(p, int(l), c) for p, l, c in split[k]] for k in ("train", "val", "test")}


def by_label(items):
    groups = {}  # dicts keep insertion order, like Dassl's defaultdict
    for it in items:
        groups.setdefault(it[1], []).append(it)
    return groups


def fewshot(items, shots):
    out = []
    for group in by_label(items).values():
        out.extend(random.sample(group, shots) if len(group) >= shots else group)
    return out


def subsample(which, *sets):
    labels = sorted({it[1] for it in sets[0]})
    m = math.ceil(len(labels) / 2)
    keep = labels[:m] if which == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(keep)}
    return [[(p, relabel[l], c) for p, l, c in s if l in relabel] for s in sets]


def digest(items):
    h = hashlib.sha256()
    for p, l, c in items:
        h.update(f"{p}\t{l}\t{c}\n".encode())
    return h.hexdigest()


def run(split, shots, seed):
    random.seed(seed)
    train = fewshot(split["train"], shots)
    val = fewshot(split["val"], min(shots, 4))
    return train, val


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join("..", "shared", "data", "coop_data"))
    ap.add_argument("--out", default=os.path.join("tests", "fixtures", "coop", "fewshot_reference.json"))
    args = ap.parse_args()
    ref = {"python": sys.version.split()[0], "fixture": [], "real": []}

    fx = read_split(os.path.join("tests", "fixtures", "coop", "dtd", "split_zhou_DescribableTextures.json"))
    for shots in (1, 2):
        for seed in SEEDS:
            train, val = run(fx, shots, seed)
            b_train, b_val, b_test = subsample("base", train, val, fx["test"])
            ref["fixture"].append({
                "shots": shots, "seed": seed,
                "train": [list(x) for x in train], "val": [list(x) for x in val],
                "base_train": [list(x) for x in b_train], "base_test": [list(x) for x in b_test],
            })

    for folder, name in REAL:
        path = os.path.join(args.data, folder, f"split_zhou_{name}.json")
        if not os.path.exists(path):
            print(f"skipping {path} (not found)")
            continue
        split = read_split(path)
        for shots in SHOTS:
            for seed in SEEDS:
                train, val = run(split, shots, seed)
                entry = {
                    "dataset": name, "shots": shots, "seed": seed,
                    "train_len": len(train), "val_len": len(val),
                    "train_sha256": digest(train), "val_sha256": digest(val),
                    "train_first": [list(x) for x in train[:3]], "val_first": [list(x) for x in val[:3]],
                }
                for which in ("base", "new"):
                    tr, va, te = subsample(which, train, val, split["test"])
                    entry[which] = {
                        "classes": len({x[1] for x in tr}), "train": len(tr), "val": len(va), "test": len(te),
                        "test_sha256": digest(te),
                    }
                ref["real"].append(entry)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(ref, f, indent=1)
    print(f"wrote {args.out}: {len(ref['fixture'])} fixture cases, {len(ref['real'])} real cases")


if __name__ == "__main__":
    main()
