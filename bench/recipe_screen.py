"""Quick screening of training recipes without Ray: one process, the family's own training step
(aigc_ray.models registry), the prepared dataset held in memory, the house domain metrics.

Each variant is a shipped config plus dotted overrides; it trains for --steps generator steps
(or --seconds of wall clock, whichever comes first), is scored --evals times on EMA weights
(1,000 samples by default, the same protocol as aigc_ray.eval.quality: N generated vs N train
images, floor = N test vs N train), and its best score is kept. Writes one JSON line per variant
to --out and the fixed-noise 8x8 grid of its best evaluation to bench/results/screen-<name>.png.

    python bench/recipe_screen.py --config dcgan-digits --steps 1300 \\
        base='{}' noaug='{"model.options.diffaugment": ""}'

This is for ranking recipes fast; final numbers come from bench/quality.py (through Ray Train).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from real_vs_generated import colourfulness  # noqa: E402 (bench/, beside this script)

from aigc_ray.config import load_config  # noqa: E402
from aigc_ray.data.augment import augment_batch  # noqa: E402
from aigc_ray.data.pipeline import ensure_prepared, load_split  # noqa: E402
from aigc_ray.eval.featnet import load_or_train  # noqa: E402
from aigc_ray.eval.quality import domain_metrics  # noqa: E402
from aigc_ray.models import get_family  # noqa: E402
from aigc_ray.models.registry import TrainNets  # noqa: E402
from aigc_ray.models.steps import StepContext  # noqa: E402
from aigc_ray.pipeline import grid_png, to_uint8  # noqa: E402
from aigc_ray.train.engine import lr_scale, set_learning_rate  # noqa: E402

RESULTS = Path(__file__).parent / "results"
REPORTED = ("fid", "kid", "precision", "recall", "class_coverage", "mode_entropy", "class_accuracy")


def _pick(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, n: int, decay: float) -> None:
    """The engine's EMA with warm-up: decay min(decay, (1 + n) / (10 + n)), buffers included."""
    d = min(decay, (1 + n) / (10 + n))
    for e, p in zip([*ema.parameters(), *ema.buffers()], [*model.parameters(), *model.buffers()]):
        if e.is_floating_point():
            e.lerp_(p, 1 - d)
        else:
            e.copy_(p)


def run_variant(name: str, base: str, overrides: dict, steps: int, seconds: float, evals: int, num_samples: int,
                threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = load_config(base).with_overrides(overrides) if overrides else load_config(base)
    m, t, d = cfg.model, cfg.train, cfg.data
    prepared = ensure_prepared(d, t.seed)
    train_x, train_y = load_split(prepared, "train")
    test_x, _ = load_split(prepared, "test")
    net, _ = load_or_train(prepared, seed=0, quiet=True)
    n = min(num_samples, len(train_x), len(test_x))
    reference, held_out = _pick(train_x, n, 0), _pick(test_x, n, 1)
    floor = domain_metrics(net, reference, held_out, 0)

    family = get_family(m.family)
    torch.manual_seed(t.seed)
    G, D = family.build(m)
    betas = (t.beta1, t.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=t.lr_g, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=t.lr_d, betas=betas) if D is not None else None
    nets = TrainNets(G, D, opt_g, opt_d, m, t)
    ema = copy.deepcopy(G) if t.ema_decay > 0 else None
    ctx = StepContext()
    aug_gen = torch.Generator().manual_seed(t.seed + 1)
    z_eval = torch.randn(n, m.latent_dim, generator=torch.Generator().manual_seed(0))
    labels_eval = torch.arange(n) % m.num_classes if m.num_classes else None

    def score(step: int, elapsed: float) -> dict:
        model = ema if ema is not None else G
        model.eval()
        with torch.no_grad():
            fake = torch.cat([to_uint8(family.sample(model, z_eval[i:i + 500],
                                                      None if labels_eval is None else labels_eval[i:i + 500]))
                              for i in range(0, n, 500)])
        model.train()
        metrics = domain_metrics(net, reference, fake, 0, fake_labels=labels_eval)
        metrics = {k: round(float(v), 5) for k, v in metrics.items() if k in REPORTED}
        metrics.update(step=step, train_s=round(elapsed, 1), fid_ratio=round(metrics["fid"] / floor["fid"], 3))
        if fake.shape[1] == 3:
            metrics.update(colourfulness=round(colourfulness(fake), 1), real_colourfulness=round(colourfulness(reference), 1))
        metrics["grid"] = grid_png(fake[:64])
        return metrics

    eval_at = {max(1, round(steps * (i + 1) / evals)) for i in range(evals)}
    history, g_steps, batches, train_s = [], 0, 0, 0.0
    gen = torch.Generator().manual_seed(t.seed)
    done = False
    while not done:
        order = torch.randperm(len(train_x), generator=gen)
        for start in range(0, len(order) - t.batch_size + 1, t.batch_size):  # drop the last partial batch
            began = time.perf_counter()
            idx = order[start:start + t.batch_size]
            real = train_x[idx].float() / 127.5 - 1
            if d.augment:
                real = augment_batch(real, random_crop=d.random_crop, rotation_degrees=d.rotation_degrees,
                                     scale_range=d.scale_range, horizontal_flip=d.horizontal_flip, generator=aug_gen)
            batches += 1
            nets.progress = g_steps / steps  # per step here, per epoch in the engine's loop
            scale = lr_scale(nets.progress, t.lr_decay_start)
            set_learning_rate(opt_g, t.lr_g * scale)
            set_learning_rate(opt_d, t.lr_d * scale)
            update_g = batches % t.critic_steps == 0 or not family.capabilities.adversarial
            family.train_step(nets, real, train_y[idx] if m.num_classes else None, ctx, update_g)
            if update_g:
                if ema is not None:
                    _ema_update(ema, G, g_steps, t.ema_decay)
                g_steps += 1
            train_s += time.perf_counter() - began
            if update_g and (g_steps in eval_at or train_s >= seconds):
                history.append(score(g_steps, train_s))
                last = history[-1]
                print(f"  {name} step {g_steps} ({train_s:.0f} s): fid/floor {last['fid_ratio']}"
                      f" class accuracy {last.get('class_accuracy', '-')}"
                      f" colourfulness {last.get('colourfulness', '-')} (real {last.get('real_colourfulness', '-')})",
                      file=sys.stderr, flush=True)
                if g_steps >= steps or train_s >= seconds:
                    done = True
                    break
    best = min(history, key=lambda h: h["fid"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"screen-{name}.png").write_bytes(best.pop("grid"))
    for h in history:
        h.pop("grid", None)
    return {"name": name, "config": base, "overrides": overrides, "steps": g_steps, "train_s": round(train_s, 1),
            "s_per_step": round(train_s / max(g_steps, 1), 4), "floor_fid": round(floor["fid"], 5),
            "floor_kid": round(floor["kid"], 6), "best": best, "history": history}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="dcgan-digits")
    ap.add_argument("--steps", type=int, default=1300)
    ap.add_argument("--seconds", type=float, default=float("inf"), help="stop a variant after this much training time")
    ap.add_argument("--evals", type=int, default=4)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "screen.jsonl"))
    ap.add_argument("variants", nargs="+", help="NAME='{json overrides}'")
    args = ap.parse_args()
    for spec in args.variants:
        name, _, raw = spec.partition("=")
        result = run_variant(name, args.config, json.loads(raw or "{}"), args.steps, args.seconds, args.evals,
                             args.num_samples, args.threads)
        b = result["best"]
        print(f"{name:<28} fid/floor {b['fid_ratio']:6.2f} (step {b['step']}) kid {b['kid']:.4f} "
              f"P {b['precision']:.2f} R {b['recall']:.2f} cov {b.get('class_coverage')} "
              f"{result['s_per_step'] * 1000:.0f} ms/step", flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
