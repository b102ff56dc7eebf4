"""`aigc-ray` command line: parse, build the config, call one function. Heavy imports
(Ray, torch) happen inside each command so `--help` is instant."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from aigc_ray import __version__
from aigc_ray.config import ConfigError, ExperimentConfig, load_config, named_configs


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("config (flags override the config file)")
    g.add_argument("--config", help=f"shipped config name ({', '.join(named_configs())}) or a YAML file; "
                                    "default: dcgan-digits")
    g.add_argument("--model", help="model family (model.family): dcgan, wgan-gp, vae, ae, seed-recipe or any other "
                                   "registered one (an unknown name lists them); its settings: --set model.options.KEY=V")
    g.add_argument("--dataset", help="digits | shapes | mnist | fashion-mnist | cifar10 | folder:PATH | parquet:PATH")
    g.add_argument("--data-root", help="where torchvision datasets and prepared copies live")
    g.add_argument("--image-size", type=int, help="8, 16, 32, 64 or 128 (data and model)")
    g.add_argument("--channels", type=int, choices=(1, 3), help="1 or 3 (data and model)")
    g.add_argument("--epochs", type=int, help="passes over the training split (train.epochs)")
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
                       seed=args.seed, overwrite=args.overwrite, max_file_bytes=args.max_file_bytes,
                       max_pixels=args.max_pixels)
    summary = {k: manifest[k] for k in ("source", "counts", "dropped", "skipped", "num_classes", "content_hash")}
    print(json.dumps(summary, indent=2))
    print(storage.resolve(args.out))  # a local path made absolute, or the s3:// / gs:// URI
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if getattr(cfg, "modality", "image") == "text":  # a language model (gpt-stdlib, ...): train/text_loop.py
        from aigc_ray.train.text_loop import main_print
        from aigc_ray.train.text_loop import run_text_training as run_training
    else:
        from aigc_ray.train.loop import main_print, run_training

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

    with storage.localized(args.checkpoint) as local:
        pipe = GeneratorPipeline.from_checkpoint(local)
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


def cmd_tune(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from aigc_ray.tuning.spec import load_spec

    if args.promote and not (args.address or os.environ.get("RAY_ADDRESS")):
        raise ValueError("--promote: the sweep must run on the Ray cluster that serves the model: give --address "
                         "(auto: the local one `aigc-ray serve` started) or set RAY_ADDRESS")
    from aigc_ray.tuning.text_sweep import is_text_spec

    if is_text_spec(args.spec):  # a text model's sweep (modality: text): tuning/text_sweep.py
        return _tune_text(args)
    spec = load_spec(args.spec, smoke=args.smoke_test, num_samples=args.num_samples)
    if args.metric:
        spec = dataclasses.replace(spec, metric=args.metric)
    if args.dry_run:
        print(yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
        return 0
    from aigc_ray.tuning.sweep import format_table, run_sweep

    outcome = run_sweep(spec, out=args.out, storage_path=args.storage_path, resume=args.resume, address=args.address)
    print(format_table(outcome))
    if outcome.interrupted:
        print(f"sweep interrupted; continue it with: aigc-ray tune --spec {args.spec} --resume"
              + (" --smoke-test" if args.smoke_test else "") + f" --out {args.out}", file=sys.stderr)
        return 130
    if outcome.exported:
        print(f"best checkpoint: {outcome.exported}  (aigc-ray serve --checkpoint {outcome.exported})")
    if outcome.exported and args.promote:  # the same gate and swap as `aigc-ray promote --checkpoint BEST`
        from aigc_ray.serving.promote import PromoteRequest, promote

        return promote(PromoteRequest(model=args.promote, candidate=outcome.exported, address=args.address))
    return 0 if outcome.best is not None else 1


def _tune_text(args: argparse.Namespace) -> int:
    import dataclasses

    from aigc_ray.tuning.text_sweep import load_text_spec, run_text_sweep

    spec = load_text_spec(args.spec, smoke=args.smoke_test, num_samples=args.num_samples)
    if args.metric:
        spec = dataclasses.replace(spec, metric=args.metric)
    if args.dry_run:
        print(yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
        return 0
    summary = run_text_sweep(spec, out=args.out, storage_path=args.storage_path, resume=args.resume,
                             address=args.address)
    for row in summary["trials"]:
        print(f"{row['trial']}: {row['config']} epochs={row['epochs']} best {spec.metric}={row[spec.metric]} "
              f"(epoch {row['best_epoch']})" + (f" FAILED: {row['error']}" if row["error"] else ""))
    if summary["interrupted"]:
        print(f"sweep interrupted; continue it with: aigc-ray tune --spec {args.spec} --resume"
              + (" --smoke-test" if args.smoke_test else "")
              + (f" --num-samples {args.num_samples}" if args.num_samples else "") + f" --out {args.out}"
              + (f" --storage-path {args.storage_path}" if args.storage_path else ""), file=sys.stderr)
        return 130
    exported = summary["exported"]
    if not exported:
        return 1
    print(f"best trial: {summary['best']['trial']} {spec.metric}={summary['best'][spec.metric]}")
    print(f"best checkpoint: {exported}  (aigc-ray serve --checkpoint {exported})")
    if args.promote:  # the same gate and swap as `aigc-ray promote --model NAME --checkpoint BEST`
        from aigc_ray.serving.promote import PromoteRequest, promote

        # a re-scoring (the served card on other blocks) reads the sweep's prepared corpus
        return promote(PromoteRequest(model=args.promote, candidate=exported, address=args.address,
                                      data_root=spec.base_config().data.data_root))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from aigc_ray.eval import evaluate_checkpoint, format_table

    if args.num_samples is not None and args.num_samples < 10:
        raise ValueError("--num-samples must be >= 10")
    if args.draws is not None and not 2 <= args.draws <= 1000:
        raise ValueError(f"--draws: 2..1000 (an interval needs at least 2 draws), got {args.draws}")
    # an explicit --num-samples the data can't give is an error saying how many it can (the config's is capped)
    result = evaluate_checkpoint(args.checkpoint, num_samples=args.num_samples, seed=args.seed,
                                 write_card=not args.no_card, dataset=args.dataset, data_root=args.data_root,
                                 draws=args.draws, strict=args.num_samples is not None)
    card = result["card"]
    print(json.dumps(card, indent=2) if args.json else format_table(card))
    if not args.no_card:
        print(f"card written: {args.checkpoint.rstrip('/')}/card.json", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from aigc_ray.export import export_checkpoint

    meta = export_checkpoint(args.checkpoint, args.format, args.out, args.graph)
    print(f"exported {meta['family']} {meta['graph']} graph of {meta['model_version']} as {args.format}"
          + (f" (opset {meta['opset']})" if "opset" in meta else ""), file=sys.stderr)
    print(args.out)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from aigc_ray import promotion as pr
    from aigc_ray.serving.promote import PromoteRequest, promote

    candidate = args.checkpoint or (pr.sweep_candidate(args.sweep) if args.sweep else None)
    req = PromoteRequest(model=args.model, candidate=candidate, url=args.url, served=args.served, metric=args.metric,
                         min_gain=args.min_gain, no_rescore=args.no_rescore, dataset=args.dataset,
                         data_root=args.data_root, gate_only=args.gate_only, canary=args.canary,
                         max_error_rate=args.max_error_rate, min_requests=args.min_requests,
                         canary_timeout_s=args.canary_timeout, finish=args.finish,
                         rollback=args.rollback, address=args.address, dashboard=args.dashboard)
    return promote(req)


def cmd_serve(args: argparse.Namespace) -> int:
    from aigc_ray.serving.app import run_until_interrupted

    options = {"checkpoints": args.checkpoint, "max_num_images": args.max_num_images,
               "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
               "replica_gpus": args.replica_gpus, "api_token_file": args.api_token_file or "",
               "access_log": not args.no_access_log}
    return run_until_interrupted(options, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                                 address=args.address, insecure=args.insecure, ingress=args.ingress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aigc-ray", description="Train, tune, evaluate and serve image generators (GANs, VAEs) on Ray.",
        epilog="Offline defaults: `aigc-ray train` trains the dcgan-digits config on a local Ray.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="clean and convert a dataset into Parquet shards + manifest",
                       description="Decode, clean (undecodable, blank, duplicate) and convert a source to "
                                   "Parquet shards of PNG bytes with a manifest. The source is never modified.")
    p.add_argument("--dataset", required=True, help="digits | shapes | mnist | fashion-mnist | cifar10 | "
                                                    "folder:PATH | parquet:PATH")
    p.add_argument("--out", required=True, help="output directory (must be new or empty), or an s3:// / gs:// URI")
    p.add_argument("--image-size", type=int, default=16, choices=(8, 16, 32, 64, 128),
                   help="every image is resized to this square size (default 16)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="1 (grayscale, default) or 3 (RGB)")
    p.add_argument("--data-root", default="~/.cache/aigc-ray", help="where torchvision datasets live")
    p.add_argument("--download", action="store_true", help="let torchvision download (needs network)")
    p.add_argument("--num-shapes", type=int, default=4096, help="images drawn for the shapes source")
    p.add_argument("--seed", type=int, default=42, help="seed of the shapes drawn and of the train/test split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset (the old one "
                                                            "stays until the new one is complete)")
    p.add_argument("--max-file-bytes", type=int, default=64 * 2**20,
                   help="skip (and count) source files larger than this (default 64 MiB)")
    p.add_argument("--max-pixels", type=int, default=64 * 2**20,
                   help="drop (and count) images with more pixels than this, judged from the header (default 64M)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a generator with Ray Train (local Ray or a cluster)",
                       description="Data-parallel training with Ray Train. Without --address or RAY_ADDRESS it "
                                   "starts a local Ray; under `ray job submit` it joins that cluster. The last "
                                   "line printed is the path of the best checkpoint by domain FID (evaluated "
                                   "every eval.every_epochs epochs and at the end; the last checkpoint with "
                                   "--set eval.enabled=false).")
    _add_config_args(p)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample images from a checkpoint (no Ray needed)",
                       description="Rebuild the generator from the checkpoint alone and write a PNG grid. "
                                   "The same seed gives the same file bytes.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (or s3:// / gs:// URI)")
    p.add_argument("--num-images", type=int, default=64, help="images in the grid (default 64)")
    p.add_argument("--seed", type=int, default=42, help="image i uses seed + i")
    p.add_argument("--labels", help="comma-separated class labels for a conditional model (one = all)")
    p.add_argument("--nrow", type=int, help="images per grid row (default: square)")
    p.add_argument("--out", default="samples.png", help="PNG file to write (default: samples.png)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="score a checkpoint: domain FID/KID, floor, ceiling; writes card.json",
                       description="Generate images from the checkpoint and compare them with the real training "
                                   "images through the dataset's own feature network (trained once, cached beside "
                                   "the prepared data): FID, KID, precision/recall, and for labelled data the "
                                   "classifier inception score and mode coverage. Each metric is the mean of several "
                                   "generator draws with its 95% interval, beside its floor (real test images vs the "
                                   "train split at the same sample count, with a bootstrap interval) and its ceiling "
                                   "(the untrained generator); ratio = value / floor. Also checks for memorisation "
                                   "(samples nearer training images than held-out ones). Writes card.json into the "
                                   "checkpoint; an older-protocol card there is kept as card.<format>.json.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (or s3:// / gs:// URI)")
    p.add_argument("--num-samples", type=int, help="images per draw (default: the checkpoint's eval.num_samples, "
                                                   "capped at the test split's size; more than that is an error "
                                                   "saying how many the data allows)")
    p.add_argument("--draws", type=int, help="generator draws whose mean and 95%% interval each score is "
                                             "(default: the checkpoint's eval.draws, 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws' latents (draw d: seed*1000+d) and of the "
                                                       "floor's resampling; two cards with one seed pair draw by draw")
    p.add_argument("--dataset", help="the prepared dataset the checkpoint was trained on (a directory written by "
                                     "`aigc-ray prepare`); default: found by its content hash under --data-root")
    p.add_argument("--data-root", help="whose prepared/ cache to search (default: ~/.cache/aigc-ray); the data "
                                       "settings a checkpoint carries are never used to read or write data")
    p.add_argument("--json", action="store_true", help="print the whole card as JSON instead of the table")
    p.add_argument("--no-card", action="store_true", help="don't write card.json")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tune", help="hyperparameter sweep with Ray Tune (ASHA, PBT, FIFO), scored by domain FID",
                       description="Run the sweep a spec (tune/*.yaml) describes: one Ray Train run per trial, one "
                                   "line per trial report, then a table and the best trial, whose best checkpoint "
                                   "is exported to OUT/best (servable, and loadable by `aigc-ray generate`).")
    p.add_argument("--spec", required=True, help="sweep spec YAML, e.g. tune/dcgan_asha.yaml")
    p.add_argument("--num-samples", type=int, help="override the spec's num_samples")
    p.add_argument("--smoke-test", action="store_true", help="apply the spec's smoke: variant (tiny, for CI)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep of the same name (finished trials are kept, not rerun)")
    p.add_argument("--storage-path", help="where Tune and Train keep trials and checkpoints: a shared path or "
                                          "s3:// / gs:// URI (default: --out)")
    p.add_argument("--out", default="runs/tune", help="local output: summary.json and best/ (default: runs/tune)")
    p.add_argument("--metric", help="rank trials by this metric instead of the spec's (e.g. loss_g)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--dry-run", action="store_true", help="print the validated spec and exit")
    p.add_argument("--promote", metavar="NAME", help="at the end, swap the best checkpoint into served model NAME if "
                                                     "its card beats the served one's (as `aigc-ray promote`), on the "
                                                     "cluster the sweep ran on (--address)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript for offline, embedded generation",
                       description="Trace the checkpoint's graph through the same pipeline Serve uses and write it "
                                   "as ONNX (opset 17, for onnxruntime) or TorchScript, with a free batch dimension. "
                                   "generate: z float32 (N, latent_dim) [+ labels int64 (N,)] -> uint8 (N, C, S, S); "
                                   "encode: uint8 images -> the encoder's mean; reconstruct: uint8 -> uint8 (vae, "
                                   "ae). The file carries the model version, family, sizes, class count, latent "
                                   "rule and quality card (ONNX metadata_props; TorchScript extra file "
                                   "aigc_ray.json). examples/offline_generate.py turns seeds into labelled PNGs "
                                   "with only onnxruntime, numpy and Pillow. A text checkpoint (gpt, rnn-lm) exports "
                                   "as onnx only, graph step: one decoding step with its KV cache (gpt) or hidden "
                                   "state (rnn-lm), the vocabulary and model config in the metadata; "
                                   "aigc_ray/text_onnx.py decodes it with only onnxruntime and numpy.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (or s3:// / gs:// URI)")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"),
                   help="onnx (for onnxruntime, no torch needed) or torchscript (frozen; image checkpoints only)")
    p.add_argument("--graph", choices=("generate", "encode", "reconstruct", "step"),
                   help="which computation to export (default: generate; a text checkpoint's only graph is step, "
                        "one decoding step with its KV cache / hidden state)")
    p.add_argument("--out", required=True, help="output file, e.g. model.onnx or model.pt")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("promote", help="quality-gated rollout: swap (or canary) a candidate into served model NAME",
                       description="Compare the candidate's quality card with the served model's on the same "
                                   "protocol (dataset content hash, sample count, seed; the candidate is re-scored "
                                   "when only the count or seed differ) and print both side by side; if it is better "
                                   "by --min-gain, swap it into the running app (`aigc-ray serve` or `serve deploy`) "
                                   "in place, or with --canary beside the current version. Exit 0: promoted; 1: "
                                   "refused, nothing changed; 2: the cards can't be compared or the rollout failed "
                                   "(the app keeps serving what it served).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="candidate checkpoint directory (or s3:// / gs:// URI)")
    src.add_argument("--sweep", help="a sweep's --out directory: its exported best checkpoint is the candidate")
    src.add_argument("--finish", action="store_true", help="end model NAME's canary: the candidate becomes NAME")
    src.add_argument("--rollback", action="store_true", help="end model NAME's canary: the candidate is removed")
    p.add_argument("--model", required=True, help="served model name (GET /v1/models)")
    cur = p.add_mutually_exclusive_group()
    cur.add_argument("--url", help="a running server (http://127.0.0.1:8000): the served card from /v1/models "
                                   "(default: asked of the app through Ray)")
    cur.add_argument("--served", help="the checkpoint NAME serves now (its card.json)")
    p.add_argument("--metric", help="card metric to compare (default: fid, lower is better; a text model: val_bpb, "
                                    "validation bits/byte paired over the same validation blocks)")
    p.add_argument("--min-gain", type=float, default=0.05, help="required relative improvement (default 0.05)")
    p.add_argument("--no-rescore", action="store_true", help="refuse instead of re-scoring on another sample count/seed")
    p.add_argument("--dataset", help="for a re-score: the prepared dataset directory the cards were measured on "
                                     "(default: found by content hash under --data-root)")
    p.add_argument("--data-root", help="for a re-score: where prepared datasets are cached (default ~/.cache/aigc-ray)")
    p.add_argument("--gate-only", action="store_true", help="judge only (exit 0 or 1); change nothing")
    p.add_argument("--canary", type=float, metavar="PERCENT", help="serve the candidate beside the current version "
                                                                  "with PERCENT of the requests (0-100)")
    p.add_argument("--max-error-rate", type=float, default=0.05,
                   help="canary: roll back by itself when the candidate's error rate is confidently (95%% Wilson lower bound) "
                        "above this share and above the current version's (default 0.05; 0 <= R < 1)")
    p.add_argument("--min-requests", type=int, default=20,
                   help="canary: requests the candidate answers before its error rate counts (default 20)")
    p.add_argument("--canary-timeout", type=float, default=10.0, metavar="S",
                   help="canary: a candidate's answer later than this is its error; the current version answers")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else the local one)")
    p.add_argument("--dashboard", help="Ray dashboard URL, for an app started with `serve deploy` "
                                       "(default: RAY_DASHBOARD_ADDRESS, else the cluster's)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("serve", help="serve checkpoints over HTTP and gRPC with Ray Serve (until Ctrl-C)",
                       description="Deploy one autoscaled, batching model deployment per checkpoint behind HTTP "
                                   "(/v1/generate, /docs) and gRPC (aigc.v1.Generator, grpc.health.v1). The first "
                                   "checkpoint is the default model; requests pick others by name ('model').")
    p.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]PATH",
                   help="checkpoint directory or s3:// / gs:// URI (repeatable); NAME defaults to the run directory")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (gRPC: Ray binds all interfaces)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=9000, help="gRPC port (default 9000)")
    p.add_argument("--min-replicas", type=int, default=1, help="autoscaling floor per model")
    p.add_argument("--max-replicas", type=int, default=2, help="autoscaling ceiling per model")
    p.add_argument("--max-num-images", type=int, default=64, help="most images per request")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per model replica (default 0: CPU)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--api-token-file", help="file holding the bearer token clients must send (default: the "
                                            "AIGC_API_TOKEN environment variable; neither: no authentication)")
    p.add_argument("--no-access-log", action="store_true",
                   help="no access log line per request (Serve's proxies and replicas): less work per request")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a token (anyone who reaches the ports can call)")
    from aigc_ray.serving.options import INGRESSES

    p.add_argument("--ingress", choices=INGRESSES, default="proxy",
                   help="what takes requests in: Ray Serve's proxy actors (default), or HAProxy sending each request "
                        "straight to a replica (2-3x the requests/s on a small machine; opens a stats page and a "
                        "metrics endpoint on every interface, on free ports; only when this command starts Ray)")
    p.set_defaults(func=cmd_serve)
    for command in sub.choices.values():  # also after the command; SUPPRESS keeps a -v given before it
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


VERBOSE_HELP = "also show Ray's own log lines (INFO, its token-auth notice) and full tracebacks"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "num_images", 1) is not None and getattr(args, "num_images", 1) < 1:
        parser.error("--num-images must be >= 1")
    from aigc_ray import console

    console.set_verbose(args.verbose)
    # exit codes: 0 done; 1 the run failed (or promote refused); 2 usage or a bad value; 130 Ctrl-C
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"aigc-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aigc-ray {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the run itself failed: say why in one line; -v shows where
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"aigc-ray {args.command}: failed: {type(err).__name__}: {err}"
              + ("" if args.verbose else "  (-v shows the traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
