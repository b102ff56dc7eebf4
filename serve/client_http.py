"""Minimal HTTP client: generate images and write them as PNG files, or (text mode, --prompt) continue a
prompt with a text model and print the stream as it arrives (server-sent events).

    python serve/client_http.py --url http://127.0.0.1:8000 --num-images 4 --seed 42 --out-dir out/
    python serve/client_http.py --prompt "def main():" --max-new-tokens 200 --seed 1
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
    p.add_argument("--prompt", help="text mode: the prompt a text model continues (streamed to stdout)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="text mode: bytes to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="text mode: 0 = greedy")
    args = p.parse_args()
    if args.prompt is not None:
        return complete(args)
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


def complete(args) -> int:
    """POST /v1/complete with stream: print each piece as its event arrives; the label and totals to stderr."""
    body = {"prompt": args.prompt, "model": args.model, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "seed": args.seed, "stream": True}
    req = urllib.request.Request(f"{args.url}/v1/complete", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", "accept": "text/event-stream",
                                          **({"authorization": f"Bearer {args.token}"} if args.token else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            event = "message"
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "message":
                        print(data["text"], end="", flush=True)
                    elif event == "done":
                        print(f"\n[{data['model_version']} seed {data['seed']}: {data['tokens']} tokens, "
                              f"{data['finish_reason']}; AI-generated: {data['ai_generated']}]", file=sys.stderr)
                    elif event == "error":
                        print(f"\nerror: {data['error']}", file=sys.stderr)
                        return 1
                    event = "message"
    except urllib.error.HTTPError as err:
        print(f"HTTP {err.code}: {err.read().decode()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
