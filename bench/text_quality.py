"""Text quality at equal wall-clock: the shipped gpt-stdlib Transformer against the gru-stdlib recurrent
baseline and byte n-grams (orders 1-6), all scored on the same validation blocks of the stdlib corpus.

    python bench/text_quality.py [--budget-s 240] [--cpus 1]

Each model trains through the product path (Ray Train, `run_text_training`) for the same training time
(train.max_time_s; validation and checkpoints between epochs are not counted), then its best checkpoint
is re-scored on every validation block. Reports bits per byte with 95% t-intervals over blocks, and the
paired per-block difference gpt - gru and gpt - best n-gram (negative = gpt better) with its interval.
Writes bench/results/text_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aigc_ray.config import load_config  # noqa: E402
from aigc_ray.data.text import ensure_prepared_text, load_tokens, read_text_manifest  # noqa: E402
from aigc_ray.models.text_checkpoint import load_text_model  # noqa: E402
from aigc_ray.text_quality import interval, model_block_bits, ngram_block_bits  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "text_quality.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=240.0, help="training seconds per model")
    ap.add_argument("--cpus", type=int, default=1, help="train.cpus_per_worker (torch threads) for both models")
    ap.add_argument("--configs", default="gpt-stdlib,gru-stdlib")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from aigc_ray.train.text_loop import run_text_training

    names = args.configs.split(",")
    cfgs = {n: load_config(n) for n in names}
    block = cfgs[names[0]].model.block_size
    assert all(c.model.block_size == block for c in cfgs.values()), "compare on the same blocks"
    prepared = ensure_prepared_text(cfgs[names[0]].data)
    manifest = read_text_manifest(prepared)
    train, val = np.asarray(load_tokens(prepared, "train")), np.asarray(load_tokens(prepared, "validation"))
    grams = {n: ngram_block_bits(train, val, block, n) for n in range(1, 7)}
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version(), "threads_per_model": args.cpus,
                                 "load_avg_at_start": os.getloadavg()[0]},
                     "budget_s": args.budget_s,
                     "corpus": {k: manifest[k] for k in ("source", "python", "documents", "counts", "content_hash",
                                                         "source_hash")},
                     "block_size": block, "blocks": len(grams[1]),
                     "ngram": {f"order{n}": interval(b) for n, b in grams.items()}, "models": {}}
    best_gram = min(grams, key=lambda n: grams[n].mean())
    per_block = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in cfgs.items():
            cfg = cfg.with_overrides({"train.max_time_s": args.budget_s, "train.epochs": 10_000,
                                      "train.cpus_per_worker": args.cpus, "train.out": tmp,
                                      "train.name": f"bench-{name}", "train.max_failures": 0})
            started = time.perf_counter()
            outcome = run_text_training(cfg)
            wall = time.perf_counter() - started
            model, _ = load_text_model(outcome.checkpoint)
            bits = model_block_bits(model, val, block, "cpu")
            per_block[name] = bits
            card = json.loads((Path(outcome.checkpoint) / "card.json").read_text())
            history = [json.loads(x) for x in (Path(outcome.run_dir) / "metrics.jsonl").read_text().splitlines()]
            results["models"][name] = {
                "family": cfg.model.family, "parameters": sum(p.numel() for p in model.parameters()),
                "val_bpb": interval(bits), "steps": outcome.metrics.get("step"), "trained_s": history[-1]["trained_s"],
                "tokens_per_s": float(np.median([h["tokens_per_s"] for h in history])), "wall_s": wall,
                "curve": [{k: h[k] for k in ("epoch", "step", "trained_s", "train_bpb", "val_bpb")} for h in history],
                "sample": card["sample"]}
            print(f"{name}: {interval(bits)['mean']:.3f} bits/byte after {history[-1]['trained_s']:.0f} s "
                  f"({outcome.metrics.get('step')} steps)", flush=True)
    gpt, gru = names[0], names[1] if len(names) > 1 else None
    results["paired"] = {f"{gpt}_minus_order{best_gram}_gram": interval(per_block[gpt] - grams[best_gram]),
                         f"{gpt}_minus_bigram": interval(per_block[gpt] - grams[2])}
    if gru:
        results["paired"][f"{gpt}_minus_{gru}"] = interval(per_block[gpt] - per_block[gru])
    results["best_ngram_order"] = best_gram
    results["verdict"] = {name: value["hi"] < 0 for name, value in results["paired"].items()}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"ngram": {k: round(v["mean"], 3) for k, v in results["ngram"].items()},
                      "models": {k: round(v["val_bpb"]["mean"], 3) for k, v in results["models"].items()},
                      "paired": results["paired"], "verdict": results["verdict"]}, indent=2))
    print(args.out)


if __name__ == "__main__":
    main()
