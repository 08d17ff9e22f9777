#!/usr/bin/env python3
"""A minimal capt-edge client (needs only `requests`).

    python examples/client.py --url http://127.0.0.1:8080 cat.jpg            # one image, raw body
    python examples/client.py --url http://127.0.0.1:8080 a.jpg b.png --top-k 3   # several: multipart
    CAPT_EDGE_API_KEY=... python examples/client.py --url https://edge.example:8080 img.jpg

Prints one line per image (`name: label (probability), ...`), or the server's JSON with --json.
Exit status 0 on success, 1 when the server answers with an error (its code and message are
printed), 2 on bad arguments or an unreachable server.
"""
import argparse
import json
import os
import sys

import requests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, BMP)")
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    ap.add_argument("--top-k", type=int, default=5, help="labels per image")
    ap.add_argument("--api-key", default=os.environ.get("CAPT_EDGE_API_KEY"),
                    help="bearer key (default: $CAPT_EDGE_API_KEY)")
    ap.add_argument("--json", action="store_true", help="print the server's JSON answer")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds")
    a = ap.parse_args()

    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    url = f"{a.url.rstrip('/')}/v1/classify"
    params = {"top_k": a.top_k}
    try:
        if len(a.images) == 1:
            # One image: the raw bytes as the body, with its media type.
            with open(a.images[0], "rb") as f:
                body = f.read()
            headers["Content-Type"] = "application/octet-stream"
            r = requests.post(url, params=params, data=body, headers=headers, timeout=a.timeout)
        else:
            # Several: one multipart file part each; results come back in the same order.
            files = [(os.path.basename(p), (os.path.basename(p), open(p, "rb"))) for p in a.images]
            r = requests.post(url, params=params, files=files, headers=headers, timeout=a.timeout)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except requests.RequestException as e:
        print(f"error: cannot reach {url}: {e}", file=sys.stderr)
        return 2

    if r.status_code != 200:
        try:
            err = r.json()["error"]
            print(f"error {r.status_code} {err['code']}: {err['message']}", file=sys.stderr)
        except (ValueError, KeyError):
            print(f"error {r.status_code}: {r.text[:200]}", file=sys.stderr)
        return 1
    answer = r.json()
    if a.json:
        print(json.dumps(answer, indent=2))
        return 0
    for res in answer["results"]:
        labels = ", ".join(f"{l['label']} ({l['probability']:.4f})" for l in res["top_k"])
        print(f"{res['name']}: {labels}")
    print(f"request id {r.headers.get('x-request-id', '-')}, "
          f"{answer['timing']['total_ms']:.1f} ms on the server", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
