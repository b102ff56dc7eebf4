"""Every registered model family, end to end: Ray Train for a few steps with the shard cache on
and off, its sample grid, `aigc-ray generate`, and the inference pipeline Serve runs. Plus the
registry's own rules: an unknown family or a key that means nothing for a family fails before
Ray starts, naming the key and the families that take it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from aigc_ray import cli
from aigc_ray.config import ConfigError, ExperimentConfig, load_config
from aigc_ray.models import family_names, get_family
from aigc_ray.pipeline import GeneratorPipeline

# Every registered family once, plus the class-conditional cases; each run costs ~15-30 s here,
# whatever it trains, so no path is trained twice. Two data paths: in memory (the default for a
# dataset that fits: Parquet shards decoded on the worker) and Ray Data streaming (shard cache off),
# the same code for every family. Streamed: a family that reconstructs rather than samples (its grid
# is drawn from the batches, so it once depended on the data path) and a conditional one (labels
# through Ray Data). The conditional VAE (a mixture prior per class) is a path of its own, in memory.
STREAMED = {("ae", 0), ("dcgan", 10)}
FAMILIES = [(name, 0) for name in family_names()] + [("dcgan", 10), ("vae", 10)]
CASES = [(f, c, 0 if (f, c) in STREAMED else 512) for f, c in FAMILIES]
assert all(get_family(f).capabilities.conditional for f, c in FAMILIES if c)


# The session's tiny dcgan and vae runs (conftest), which the CLI and serving tests load too, are
# these families' cached cases: a Train run costs ~22 s here, whatever it trains.
SHARED_RUNS = {("dcgan", 0, 512): "trained_checkpoint", ("vae", 0, 512): "trained_vae_checkpoint"}


# The streamed cases are the slow ones (`pytest -m "not slow"` leaves them out of a quick local run).
@pytest.mark.parametrize(("family", "num_classes", "cache_mb"),
                         [pytest.param(f, c, m, marks=() if m else pytest.mark.slow) for f, c, m in CASES],
                         ids=[f"{f}{'-cond' if c else ''}-{'cached' if m else 'streamed'}" for f, c, m in CASES])
def test_family_trains_samples_generates_and_serves(ray_session, tmp_path, data_root, family, num_classes, cache_mb,
                                                     request):
    from aigc_ray.train.loop import run_training

    if (family, num_classes, cache_mb) in SHARED_RUNS:
        checkpoint = request.getfixturevalue(SHARED_RUNS[family, num_classes, cache_mb])
    else:
        # 2 epochs of 5 batches: epoch 2 replays the cache when it is on; a checkpoint (with its
        # sample grid) lands mid-epoch 1, before anything is cached
        cfg = tiny_config(tmp_path, family).with_overrides({
            "data.data_root": str(data_root), "data.cache_in_memory_mb": cache_mb, "model.num_classes": num_classes,
            "train.epochs": 2, "train.batch_size": 256, "train.checkpoint_every": 3, "train.name": "fam",
            "eval.enabled": False, **({"model.options.prior": "mixture"} if family == "vae" and num_classes else {})})
        checkpoint = run_training(cfg).checkpoint
    spec = get_family(family)

    grids = sorted((Path(checkpoint).parent / "samples").glob("epoch_*.png"))
    assert grids, "no sample grid written"
    grid = Image.open(grids[-1])
    assert grid.size == (8 * 8 + 9 * 2,) * 2 and len(set(grid.convert("L").getdata())) > 1  # 8x8 cells, not bare padding

    pipe = GeneratorPipeline.from_checkpoint(checkpoint)
    labels = [3, 4] if num_classes else None
    if spec.capabilities.generate:
        images = pipe.generate([5, 6], labels)
        assert images.shape == (2, 1, 8, 8) and images.dtype == torch.uint8
        assert torch.equal(images, pipe.generate([5, 6], labels))  # same seeds, same bytes
        if num_classes:  # no labels: class seed mod num_classes, so a seed alone names one image
            assert torch.equal(pipe.generate([13, 4]), pipe.generate([13, 4], [3, 4]))
        out = tmp_path / "gen.png"
        argv = ["generate", "--checkpoint", checkpoint, "--num-images", "4", "--out", str(out)]
        assert cli.main(argv + (["--labels", "7"] if num_classes else [])) == 0
        assert Image.open(out).info["Model-Version"] == pipe.version
    else:
        with pytest.raises(ValueError, match="cannot generate"):
            pipe.generate([5, 6])
        assert cli.main(["generate", "--checkpoint", checkpoint, "--out", str(tmp_path / "x.png")]) == 2
    if spec.capabilities.reconstruct:
        real = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
        assert pipe.reconstruct(real).shape == (3, 1, 8, 8)
    else:
        with pytest.raises(ValueError, match="cannot reconstruct"):
            pipe.reconstruct(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_unknown_family_is_refused_before_ray_with_the_registered_names(tmp_path, capsys):
    code = cli.main(["train", "--model", "diffusion", "--dry-run", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "'diffusion' is not a registered model family" in err
    assert all(name in err for name in family_names())


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "dcgan", "--set", "model.options.beta=2"],
     "model.options.beta means nothing for model family 'dcgan'; families that take it: vae"),
    (["--config", "vae-digits", "--set", "train.lr_d=0.001"],
     "train.lr_d means nothing for model family 'vae'; families that use it:"),
    (["--config", "ae-digits", "--set", "model.num_classes=10"], "model family 'ae' is not class-conditional"),
    (["--config", "vae-digits", "--set", "model.num_classes=10", "--set", "model.options.prior=fitted"],
     "a class-conditional vae needs model.options.prior=mixture, not 'fitted'"),
    (["--config", "vae-digits", "--set", "model.num_classes=10000", "--set", "model.latent_dim=64"],
     "mixture_components=30 x model.num_classes=10000"),
])
def test_a_key_that_means_nothing_for_the_family_is_an_error(tmp_path, capsys, argv, message):
    assert cli.main(["train", *argv, "--dry-run", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_config_file_keys_are_checked_against_the_family(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {family: ae, options: {beta: 4.0}}\n")
    with pytest.raises(ConfigError, match="model.options.beta means nothing for model family 'ae'"):
        load_config(str(path))
    path.write_text("model: {family: vae}\ntrain: {critic_steps: 5}\n")
    with pytest.raises(ConfigError, match="train.critic_steps means nothing for model family 'vae'"):
        load_config(str(path))


def test_family_options_round_trip_and_old_flat_keys_still_load():
    cfg = ExperimentConfig().with_overrides({"model.family": "vae", "model.options.beta": 4.0})
    assert cfg.model.opts.beta == 4.0 and cfg.model.options["beta"] == 4.0 and cfg.model.options["recon_loss"] == "bce"
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    # a checkpoint written before options existed: flat keys, every key for every family
    old = {"model": {"family": "wgan-gp", "beta": 1.0, "recon_loss": "bce"}, "train": {"gp_weight": 5.0}}
    assert ExperimentConfig.from_dict(old).model.opts.gp_weight == 5.0
    with pytest.raises(ConfigError, match="model.beta means nothing for model family 'dcgan'"):
        ExperimentConfig.from_dict({"model": {"family": "dcgan", "beta": 3.0}})
    # switching family drops the old family's options instead of failing on them
    assert ExperimentConfig().with_overrides({"model.family": "vae"}).model.options["beta"] == 1.0
    assert "beta" not in cfg.with_overrides({"model.family": "dcgan"}).model.options


def test_every_family_declares_what_its_step_reports():
    for name in family_names():
        spec = get_family(name)
        cfg = tiny_config_model(name)
        G, D = spec.build(cfg)
        assert (D is not None) == spec.capabilities.adversarial
        real = torch.rand(4, 1, 8, 8) * 2 - 1
        opt_g = torch.optim.Adam(G.parameters())
        opt_d = torch.optim.Adam(D.parameters()) if D is not None else None
        from aigc_ray.models import TrainNets
        from aigc_ray.models.steps import StepContext

        out = spec.train_step(TrainNets(G, D, opt_g, opt_d, cfg, ExperimentConfig().train), real, None, StepContext(), True)
        assert set(out) == spec.train_metrics, name
        assert all(torch.isfinite(v) for v in out.values())


def tiny_config_model(family: str):
    return ExperimentConfig.from_dict({"data": {"image_size": 8}, "model": {"family": family, "image_size": 8,
                                                                          "latent_dim": 8, "width": 8}}).model

