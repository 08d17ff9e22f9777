#!/usr/bin/env python3
"""Check ONNX files written by capt-onnx with the reference tools.

For every model given (files, or directories searched for *.onnx):
  1. onnx.checker.check_model(path, full_check=True)  (path form: handles external data
     and runs strict shape inference);
  2. an onnxruntime CPU session runs it:
     - with `<stem>.io.json` beside the model (or --io FILE): the recorded inputs, and every
       output is compared with the recorded one (candle's result) within its "atol"
       (default 1e-5; integer outputs must match exactly);
     - otherwise: random inputs (symbolic dims set to --batch), outputs must be finite.

Usage (the reference venv has onnx + onnxruntime):
    /work/venv/ref/bin/python tools/check_onnx.py tests/fixtures/onnx
    CAPT_ONNX_KEEP=/tmp/onnx-out cargo test -p capt-onnx --test export
    /work/venv/ref/bin/python tools/check_onnx.py /tmp/onnx-out tests/fixtures/onnx

Exit status 0 when every model passes, 1 otherwise, 2 when onnx / onnxruntime are missing
(CI runs this only where python + onnx + onnxruntime are installed).
"""

import argparse
import json
import os
import sys


def find_models(paths):
    for p in paths:
        if os.path.isdir(p):
            for name in sorted(os.listdir(p)):
                if name.endswith(".onnx"):
                    yield os.path.join(p, name)
        else:
            yield p


def io_json_for(model_path, explicit):
    if explicit:
        return explicit
    stem = model_path[: -len(".onnx")] if model_path.endswith(".onnx") else model_path
    cand = stem + ".io.json"
    return cand if os.path.exists(cand) else None


def np_dtype(np, onnx_type):
    return {
        "tensor(float)": np.float32,
        "tensor(double)": np.float64,
        "tensor(int64)": np.int64,
        "tensor(bool)": np.bool_,
    }[onnx_type]


def check(path, io_path, batch, np, onnx, ort):
    onnx.checker.check_model(path, full_check=True)
    model = onnx.load(path, load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    opset = [(o.domain or "ai.onnx", o.version) for o in model.opset_import]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    report = f"ir {model.ir_version}, opset {opset}, {len(model.graph.node)} nodes, {len(meta)} metadata entries"

    if io_path:
        with open(io_path) as f:
            io = json.load(f)
        feeds = {
            k: np.asarray(v["data"], dtype=v["dtype"]).reshape(v["dims"])
            for k, v in io["inputs"].items()
        }
        atol = float(io.get("atol", 1e-5))
        got = dict(zip(out_names, sess.run(out_names, feeds)))
        worst = 0.0
        for name, want in io["outputs"].items():
            w = np.asarray(want["data"], dtype=want["dtype"]).reshape(want["dims"])
            g = got[name]
            if g.shape != w.shape:
                raise AssertionError(f"{name}: shape {g.shape} vs recorded {w.shape}")
            if np.issubdtype(w.dtype, np.integer):
                if not np.array_equal(g, w):
                    raise AssertionError(f"{name}: integer output differs: {g} vs {w}")
            else:
                d = float(np.max(np.abs(g.astype(np.float64) - w))) if w.size else 0.0
                worst = max(worst, d)
                if not d <= atol:
                    raise AssertionError(f"{name}: max abs diff {d:.3e} > {atol:.1e}")
        return report + f"; onnxruntime vs recorded outputs ({os.path.basename(io_path)}): max abs diff {worst:.2e}"

    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        dims = [d if isinstance(d, int) else batch for d in i.shape]
        dt = np_dtype(np, i.type)
        if dt in (np.float32, np.float64):
            feeds[i.name] = rng.standard_normal(dims).astype(dt)
        else:
            feeds[i.name] = np.zeros(dims, dtype=dt)
    outs = sess.run(out_names, feeds)
    for name, o in zip(out_names, outs):
        if o.dtype.kind == "f" and not np.all(np.isfinite(o)):
            raise AssertionError(f"{name}: non-finite values on random input")
    shapes = ", ".join(f"{n} {list(o.shape)}" for n, o in zip(out_names, outs))
    return report + f"; onnxruntime on random input (batch {batch}): {shapes}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help=".onnx files or directories")
    ap.add_argument("--io", help="inputs/expected outputs JSON (default: <stem>.io.json if present)")
    ap.add_argument("--batch", type=int, default=2, help="size for symbolic dims with random inputs")
    args = ap.parse_args()
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        print(f"check_onnx: skipped, {e} (needs numpy, onnx, onnxruntime)", file=sys.stderr)
        return 2
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    failed = 0
    models = list(find_models(args.paths))
    if not models:
        print("check_onnx: no .onnx files found", file=sys.stderr)
        return 1
    for path in models:
        try:
            msg = check(path, io_json_for(path, args.io), args.batch, np, onnx, ort)
            print(f"PASS {path}: {msg}")
        except Exception as e:  # report every model, then fail
            failed += 1
            print(f"FAIL {path}: {type(e).__name__}: {e}")
    print(f"{len(models) - failed}/{len(models)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
