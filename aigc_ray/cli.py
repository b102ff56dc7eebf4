"""`aigc-ray` command line: parse, build the config, call one function. Heavy imports
(Ray, torch) happen inside each command so `--help` is instant."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from aigc_ray.config import MODEL_FAMILIES, ConfigError, ExperimentConfig, load_config, named_configs


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("config (flags override the config file)")
    g.add_argument("--config", help=f"shipped config name ({', '.join(named_configs())}) or a YAML file; "
                                    "default: dcgan-digits")
    g.add_argument("--model", choices=MODEL_FAMILIES, help="model family (model.family)")
    g.add_argument("--dataset", help="digits | shapes | mnist | fashion-mnist | cifar10 | folder:PATH | parquet:PATH")
    g.add_argument("--data-root", help="where torchvision datasets and prepared copies live")
    g.add_argument("--image-size", type=int, help="8, 16, 32, 64 or 128 (data and model)")
    g.add_argument("--channels", type=int, choices=(1, 3), help="1 or 3 (data and model)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch size, split across workers")
    g.add_argument("--workers", type=int, help="Ray Train workers (data-parallel)")
    g.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker (AMP on)")
    g.add_argument("--max-steps", type=int, help="stop after this many generator steps")
    g.add_argument("--out", help="local output directory (default: runs)")
    g.add_argument("--storage-path", help="checkpoint storage: shared path or s3:// / gs:// URI")
    g.add_argument("--name", help="run name; rerunning an existing name resumes it")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any config field, e.g. --set train.lr_g=1e-4 (repeatable; value parsed as YAML)")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    cfg = load_config(args.config or "dcgan-digits")
    overrides = {}
    flag_keys = {"model": "model.family", "dataset": "data.dataset", "data_root": "data.data_root",
                 "epochs": "train.epochs", "batch_size": "train.batch_size", "workers": "train.workers",
                 "gpu": "train.use_gpu", "max_steps": "train.max_steps", "out": "train.out",
                 "storage_path": "train.storage_path", "name": "train.name"}
    for flag, key in flag_keys.items():
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    for flag, keys in {"image_size": ("data.image_size", "model.image_size"),
                       "channels": ("data.channels", "model.channels")}.items():
        if getattr(args, flag, None) is not None:
            overrides.update({k: getattr(args, flag) for k in keys})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return cfg.with_overrides(overrides) if overrides else cfg


def cmd_prepare(args: argparse.Namespace) -> int:
    from aigc_ray import storage
    from aigc_ray.data.prepare import prepare

    manifest = prepare(args.dataset, args.out, image_size=args.image_size, channels=args.channels,
                       data_root=args.data_root, download=args.download, num_shapes=args.num_shapes,
                       seed=args.seed, overwrite=args.overwrite)
    summary = {k: manifest[k] for k in ("source", "counts", "dropped", "num_classes", "content_hash")}
    print(json.dumps(summary, indent=2))
    print(storage.resolve(args.out))  # a local path made absolute, or the s3:// / gs:// URI
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from aigc_ray.train.loop import main_print, run_training

    cfg = config_from_args(args)
    if not cfg.train.name:  # a fresh run each time; pass --name to resume one
        import time

        cfg = cfg.with_overrides({"train.name": f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"})
    if args.dry_run:
        print(cfg.to_yaml())
        return 0
    main_print(run_training(cfg, address=args.address))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from aigc_ray import storage
    from aigc_ray.pipeline import GeneratorPipeline, grid_png

    pipe = GeneratorPipeline.from_checkpoint(storage.localize(args.checkpoint))
    seeds = list(range(args.seed, args.seed + args.num_images))
    labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    images = pipe.generate(seeds, labels)
    nrow = args.nrow or max(1, round(args.num_images ** 0.5))
    text = {"Software": "aigc-ray", "Model-Version": pipe.version, "Seed": str(args.seed),
            "AI-Generated": "true: this image was made by a generative model"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(grid_png(images, nrow=nrow, text=text))
    print(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aigc-ray", description="Train, tune, evaluate and serve image generators (GANs, VAEs) on Ray.",
        epilog="Offline defaults: `aigc-ray train` trains the dcgan-digits config on a local Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="clean and convert a dataset into Parquet shards + manifest",
                       description="Decode, clean (undecodable, blank, duplicate) and convert a source to "
                                   "Parquet shards of PNG bytes with a manifest. The source is never modified.")
    p.add_argument("--dataset", required=True, help="digits | shapes | mnist | fashion-mnist | cifar10 | "
                                                    "folder:PATH | parquet:PATH")
    p.add_argument("--out", required=True, help="output directory (must be new or empty), or an s3:// / gs:// URI")
    p.add_argument("--image-size", type=int, default=16, choices=(8, 16, 32, 64, 128))
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--data-root", default="~/.cache/aigc-ray", help="where torchvision datasets live")
    p.add_argument("--download", action="store_true", help="let torchvision download (needs network)")
    p.add_argument("--num-shapes", type=int, default=4096, help="images drawn for the shapes source")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a generator with Ray Train (local Ray or a cluster)",
                       description="Data-parallel training with Ray Train. Without --address or RAY_ADDRESS it "
                                   "starts a local Ray; under `ray job submit` it joins that cluster. The last "
                                   "line printed is the final checkpoint's path.")
    _add_config_args(p)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample images from a checkpoint (no Ray needed)",
                       description="Rebuild the generator from the checkpoint alone and write a PNG grid. "
                                   "The same seed gives the same file bytes.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (or s3:// / gs:// URI)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--seed", type=int, default=42, help="image i uses seed + i")
    p.add_argument("--labels", help="comma-separated class labels for a conditional model (one = all)")
    p.add_argument("--nrow", type=int, help="images per grid row (default: square)")
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "num_images", 1) is not None and getattr(args, "num_images", 1) < 1:
        parser.error("--num-images must be >= 1")
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"aigc-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aigc-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
