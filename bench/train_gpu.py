"""Training throughput and MFU: the Engine's fast path against a plain PyTorch loop.

For DCGAN at 32 and 64 px, WGAN-GP and the VAE (64 px, RGB, width 64, like PyTorch's
examples/dcgan) at several batch sizes, in one process on one device:

- ``plain``: the loop written the way examples/dcgan/main.py (and examples/vae) write it:
  fp32, NCHW, a DataLoader over CPU tensors copied to the device each step, separate
  errD_real.backward() / errD_fake.backward(), non-fused Adam, ``.item()`` for the logged
  numbers every step, ``cudnn.benchmark = True``. Same model classes, so the same FLOPs.
- ``fast``: the Engine (what the Ray loop runs) with the config's defaults on this device
  (bf16, channels-last, fused Adam, CUDA graphs; ``--compile`` adds torch.compile) fed from
  a GPU-resident copy of the data, as ShardBatches does after the first epoch. EMA is on.

Augmentation is off in both (the example has none). Images are random uint8; the plain loop
gets them pre-normalised as float tensors (cheaper than the example's per-sample transforms).
MFU = counted FLOPs per image (aigc_ray.train.flops) x images/s / the device's dense bf16 peak.
Writes bench/results/train_gpu-<device>.json and .png.

    python bench/train_gpu.py                                  # on a GPU machine
    python bench/train_gpu.py --device cpu --smoke              # tiny CPU smoke (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aigc_ray.config import ExperimentConfig  # noqa: E402
from aigc_ray.models import build_discriminator, build_generator  # noqa: E402
from aigc_ray.train.engine import GRAPH_WARMUP_STEPS, Engine  # noqa: E402
from aigc_ray.train.flops import mfu, peak_flops, train_flops_per_image  # noqa: E402

CASES = {
    "dcgan-32": {"family": "dcgan", "image_size": 32, "latent_dim": 100},
    "dcgan-64": {"family": "dcgan", "image_size": 64, "latent_dim": 100},
    "wgan-gp-64": {"family": "wgan-gp", "image_size": 64, "latent_dim": 100},
    "vae-64": {"family": "vae", "image_size": 64, "latent_dim": 128},
}


def make_config(case: str, batch: int, device: torch.device, args) -> ExperimentConfig:
    spec = dict(CASES[case])
    size = spec["image_size"] // 4 if args.smoke else spec["image_size"]
    wgan = spec["family"] == "wgan-gp"
    return ExperimentConfig.from_dict({
        "data": {"dataset": "shapes", "image_size": size, "channels": 3, "random_crop": False,
                 "rotation_degrees": 0.0, "scale_range": 0.0},
        "model": {"family": spec["family"], "image_size": size, "channels": 3, "width": args.width,
                  "latent_dim": 16 if args.smoke else spec["latent_dim"]},
        "train": {"batch_size": batch, "use_gpu": device.type == "cuda", "compile": args.compile,
                  "critic_steps": 5 if wgan else 1, "lr_g": 1e-4 if wgan else 2e-4, "lr_d": 1e-4 if wgan else 2e-4,
                  "beta1": 0.0 if wgan else 0.5, "beta2": 0.9 if wgan else 0.999},
    })


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the fast path: the Engine on GPU-resident data ---------------------------------------

def run_fast(cfg: ExperimentConfig, images_u8: torch.Tensor, labels: torch.Tensor, device, warmup: int, steps: int):
    engine = Engine(cfg, device)
    images, labels = images_u8.to(device), labels.to(device)  # held on the device, as ShardBatches does
    batch = cfg.train.batch_size

    def batches():
        epoch = 0
        while True:
            perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch)).to(device)
            for i in range(len(images) // batch):
                idx = perm[i * batch:(i + 1) * batch]
                yield images[idx], labels[idx]
            epoch += 1

    it = batches()
    for _ in range(warmup):  # includes compile and CUDA-graph capture
        engine.train_batch(*next(it))
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        out = engine.train_batch(*next(it))
    _sync(device)
    elapsed = time.perf_counter() - started
    finite = all(math.isfinite(float(v)) for v in out.values())
    return elapsed, finite, engine.fast_path.summary()


# --- the plain loop, the way PyTorch's examples write it ----------------------------------

def run_plain(cfg: ExperimentConfig, images_u8: torch.Tensor, device, warmup: int, steps: int, workers: int):
    m, t = cfg.model, cfg.train
    torch.backends.cudnn.benchmark = True  # examples/dcgan/main.py sets it too
    dataset = TensorDataset(images_u8.float() / 127.5 - 1)  # what the example's transforms produce
    loader = DataLoader(dataset, batch_size=t.batch_size, shuffle=True, num_workers=workers, drop_last=True)
    torch.manual_seed(t.seed)
    netG = build_generator(m).to(device)
    netD = build_discriminator(m)
    netD = netD.to(device) if netD is not None else None
    betas = (t.beta1, t.beta2)
    optimizerG = torch.optim.Adam(netG.parameters(), lr=t.lr_g, betas=betas)
    optimizerD = torch.optim.Adam(netD.parameters(), lr=t.lr_d, betas=betas) if netD is not None else None
    step_fn = {"dcgan": _plain_dcgan, "wgan-gp": _plain_wgan_gp, "vae": _plain_vae}[m.family]
    done, started, logged = 0, None, 0.0
    while done < warmup + steps:
        for (data,) in loader:
            if done == warmup:
                _sync(device)
                started = time.perf_counter()
            logged = step_fn(netG, netD, optimizerG, optimizerD, data, device, m.latent_dim, cfg, done)
            done += 1
            if done == warmup + steps:
                break
    _sync(device)
    return time.perf_counter() - started, math.isfinite(logged)


def _plain_dcgan(netG, netD, optimizerG, optimizerD, data, device, nz, cfg, i) -> float:
    criterion = torch.nn.BCEWithLogitsLoss()  # the example's Sigmoid + BCELoss, on logits
    # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
    netD.zero_grad()
    real_cpu = data.to(device)
    batch_size = real_cpu.size(0)
    label = torch.full((batch_size,), 1.0, dtype=real_cpu.dtype, device=device)
    output = netD(real_cpu)
    errD_real = criterion(output, label)
    errD_real.backward()
    D_x = output.sigmoid().mean().item()
    noise = torch.randn(batch_size, nz, device=device)
    fake = netG(noise)
    label.fill_(0.0)
    output = netD(fake.detach())
    errD_fake = criterion(output, label)
    errD_fake.backward()
    D_G_z1 = output.sigmoid().mean().item()
    errD = errD_real + errD_fake
    optimizerD.step()
    # (2) Update G network: maximize log(D(G(z)))
    netG.zero_grad()
    label.fill_(1.0)
    output = netD(fake)
    errG = criterion(output, label)
    errG.backward()
    D_G_z2 = output.sigmoid().mean().item()
    optimizerG.step()
    return errD.item() + errG.item() + 0 * (D_x + D_G_z1 + D_G_z2)


def _plain_wgan_gp(netG, netD, optimizerG, optimizerD, data, device, nz, cfg, i) -> float:
    for p in netD.parameters():
        p.requires_grad = True
    netD.zero_grad()
    real = data.to(device)
    n = real.size(0)
    D_real = netD(real).mean()
    with torch.no_grad():
        fake = netG(torch.randn(n, nz, device=device))
    D_fake = netD(fake).mean()
    alpha = torch.rand(n, 1, 1, 1, device=device)
    interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    gradients = torch.autograd.grad(netD(interpolates).sum(), interpolates, create_graph=True)[0]
    gradient_penalty = ((gradients.view(n, -1).norm(2, dim=1) - 1) ** 2).mean() * cfg.model.opts.gp_weight
    D_cost = D_fake - D_real + gradient_penalty
    D_cost.backward()
    optimizerD.step()
    logged = D_cost.item()
    if (i + 1) % cfg.train.critic_steps == 0:
        for p in netD.parameters():
            p.requires_grad = False
        netG.zero_grad()
        G_cost = -netD(netG(torch.randn(n, nz, device=device))).mean()
        G_cost.backward()
        optimizerG.step()
        logged += G_cost.item()
    return logged


def _plain_vae(model, _netD, optimizer, _opt, data, device, nz, cfg, i) -> float:
    data = data.to(device)
    optimizer.zero_grad()
    recon_batch, mu, logvar = model(data)
    BCE = F.binary_cross_entropy_with_logits(recon_batch, (data + 1) / 2, reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    loss = (BCE + KLD) / data.size(0)
    loss.backward()
    train_loss = loss.item()
    optimizer.step()
    return train_loss


# --- driver ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    p.add_argument("--batch-sizes", default="64,128,256,512")
    p.add_argument("--steps", type=int, default=50, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first (0: enough to capture graphs)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="also torch.compile in the fast path")
    p.add_argument("--plain-workers", type=int, default=2, help="DataLoader workers of the plain loop (example: 2)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    p.add_argument("--smoke", action="store_true", help="tiny models (1/4 the side, width 8) for a quick check")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.width = min(args.width, 8)
        if args.batch_sizes == p.get_default("batch_sizes"):
            args.batch_sizes = "8,16"
        args.steps = min(args.steps, 3)
        args.plain_workers = 0
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    peak = peak_flops(name, args.peak_tflops) if device.type == "cuda" or args.peak_tflops else None
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}; known: {list(CASES)}")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_float32_matmul_precision("high")

    rows, flops = [], {}
    print(f"device: {name} ({device}); peak bf16: {peak / 1e12 if peak else '?'} TFLOP/s; torch {torch.__version__}")
    print(f"{'case':<11} {'batch':>5} {'variant':<6} {'img/s':>10} {'ms/step':>8} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'x plain':>7}  fast path")
    for case in cases:
        for batch in sizes:
            cfg = make_config(case, batch, device, args)
            if case not in flops:
                flops[case] = train_flops_per_image(cfg)
            critic = cfg.train.critic_steps
            warmup = args.warmup or (2 if device.type == "cpu" else critic * (GRAPH_WARMUP_STEPS + 2))
            steps = max(critic, args.steps // critic * critic)
            n_images = batch * (warmup + steps + 1)
            g = torch.Generator().manual_seed(0)
            m = cfg.model
            images = torch.randint(0, 256, (n_images, 3, m.image_size, m.image_size), dtype=torch.uint8, generator=g)
            labels = torch.zeros(n_images, dtype=torch.long)
            plain_ips = None
            for variant in ("plain", "fast"):
                row = {"case": case, "family": m.family, "image_size": m.image_size, "batch": batch, "variant": variant}
                try:
                    if variant == "plain":
                        elapsed, finite = run_plain(cfg, images, device, warmup, steps, args.plain_workers)
                        row["fast_path"] = "fp32 NCHW DataLoader"
                    else:
                        elapsed, finite, row["fast_path"] = run_fast(cfg, images, labels, device, warmup, steps)
                except torch.cuda.OutOfMemoryError as exc:
                    row["error"] = f"out of memory: {exc}"[:200]
                    rows.append(row)
                    print(f"{case:<11} {batch:>5} {variant:<6} OOM")
                    continue
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                ips = batch * steps / elapsed
                plain_ips = ips if variant == "plain" else plain_ips
                util = mfu(ips, flops[case], peak)
                row.update(images_per_s=ips, step_ms=1e3 * elapsed / steps, finite=finite,
                           tflops=ips * flops[case] / 1e12, mfu=util,
                           speedup=ips / plain_ips if variant == "fast" and plain_ips else None)
                rows.append(row)
                mfu_s = f"{100 * util:5.1f}%" if util is not None else "    -"
                x = f"{row['speedup']:6.2f}x" if row["speedup"] else "      -"
                print(f"{case:<11} {batch:>5} {variant:<6} {ips:>10.0f} {row['step_ms']:>8.2f} {row['tflops']:>8.2f} "
                      f"{mfu_s:>6} {x:>7}  {row['fast_path']}", flush=True)

    result = {"device": name, "device_type": device.type, "torch": torch.__version__, "peak_bf16_flops": peak,
              "smoke": args.smoke, "compile": args.compile, "width": args.width, "steps": args.steps,
              "flops_per_image": flops, "results": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "train_gpu-" + ("smoke-" if args.smoke else "") + "".join(c if c.isalnum() else "_" for c in name).strip("_")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    _plot(result, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(result["flops_per_image"])
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for variant, style in (("plain", "o--"), ("fast", "s-")):
            pts = [r for r in result["results"] if r["case"] == case and r["variant"] == variant and "images_per_s" in r]
            if not pts:
                continue
            ax.plot([r["batch"] for r in pts], [r["images_per_s"] for r in pts], style, label=variant)
            for r in pts:
                if r["mfu"] is not None:
                    ax.annotate(f"{100 * r['mfu']:.0f}%", (r["batch"], r["images_per_s"]), fontsize=7,
                                textcoords="offset points", xytext=(0, 5), ha="center")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{case} ({result['flops_per_image'][case] / 1e9:.3g} GFLOP/img)", fontsize=9)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images/s")
        ax.legend(fontsize=8)
    fig.suptitle(f"training throughput on {result['device']} (labels: MFU vs bf16 peak)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
