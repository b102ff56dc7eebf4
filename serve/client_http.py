"""Minimal HTTP client: generate images and write them as PNG files.

    python serve/client_http.py --url http://127.0.0.1:8000 --num-images 4 --seed 42 --out-dir out/
"""

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--model", help="served model name (GET /v1/models); default: the first")
    p.add_argument("--num-images", type=int, default=4, help="images to generate (default 4)")
    p.add_argument("--seed", type=int, help="image i uses seed + i (default: the server picks one)")
    p.add_argument("--labels", help="comma-separated labels for a class-conditional model")
    p.add_argument("--out-dir", default="generated", help="where the PNG files go (default: generated)")
    p.add_argument("--token", default=os.environ.get("AIGC_API_TOKEN"),
                   help="bearer token the server asks for (default: the AIGC_API_TOKEN environment variable)")
    args = p.parse_args()
    body = {"num_images": args.num_images, "model": args.model, "seed": args.seed,
            "labels": [int(v) for v in args.labels.split(",")] if args.labels else None}
    req = urllib.request.Request(f"{args.url}/v1/generate", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json",
                                          **({"authorization": f"Bearer {args.token}"} if args.token else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            result = json.load(resp)
    except urllib.error.HTTPError as err:
        print(f"HTTP {err.code}: {err.read().decode()}", file=sys.stderr)
        return 1
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for seed, image in zip(result["seeds"], result["images"]):
        path = out / f"{result['model_version']}_seed{seed}.png"
        path.write_bytes(base64.b64decode(image))
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
