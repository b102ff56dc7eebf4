"""Hostile checkpoints: a config that would allocate tens of GB, weights that don't match their
config, NaN weights, and data settings naming places to read and write. Each ends in a clear
error from the commands a user runs, before anything big is allocated or anything is written."""

import json
import resource

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from aigc_ray.cli import main
from aigc_ray.models import build_generator
from aigc_ray.models.checkpoint import CheckpointError, load_generator, save_checkpoint, write_card


@pytest.fixture
def checkpoint(tmp_path):
    cfg = tiny_config(tmp_path)
    directory = tmp_path / "ckpt"
    save_checkpoint(directory, experiment=cfg, served_state=build_generator(cfg.model).state_dict(), step=0,
                    epoch=0, ema=False, dataset={"prepared": str(tmp_path / "nowhere"), "content_hash": "ab" * 32})
    return directory


def _edit_config(directory, **model):
    meta = json.loads((directory / "config.json").read_text())
    meta["model"].update(model)
    meta["experiment"]["model"].update(model)
    (directory / "config.json").write_text(json.dumps(meta))


def _generate(directory, tmp_path, capsys) -> tuple[int, str]:
    code = main(["generate", "--checkpoint", str(directory), "--num-images", "2", "--out", str(tmp_path / "g.png")])
    return code, capsys.readouterr().err


def test_a_giant_config_is_refused_before_anything_is_allocated(checkpoint, tmp_path, capsys):
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _edit_config(checkpoint, width=100_000)  # ~tens of GB if built
    code, err = _generate(checkpoint, tmp_path, capsys)
    assert code == 2 and "model.width must be in 1..1024" in err, err
    # within every per-field cap, but too big as a whole (~9 GB): counted on the meta device
    _edit_config(checkpoint, width=1024, latent_dim=4096, image_size=128)
    meta = json.loads((checkpoint / "config.json").read_text())
    meta["experiment"]["data"].update(image_size=128)
    (checkpoint / "config.json").write_text(json.dumps(meta))
    code, err = _generate(checkpoint, tmp_path, capsys)
    assert code == 2 and "parameters, over the 134,217,728 this loader accepts" in err, err
    assert not (tmp_path / "g.png").exists()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 2**20  # the peak grew < 1 GiB


@pytest.mark.parametrize("edit, message", [
    ({"width": "64"}, "model.width must be int"),
    ({"family": "gpt"}, "model.family='gpt' is not a registered model family"),
    ({"latent_dim": -1}, "model.latent_dim must be in"),
])
def test_config_values_go_through_the_configs_own_validation(checkpoint, tmp_path, capsys, edit, message):
    _edit_config(checkpoint, **edit)
    code, err = _generate(checkpoint, tmp_path, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_weights_that_do_not_match_their_config_are_refused_from_the_header(checkpoint, tmp_path, capsys):
    _edit_config(checkpoint, width=16)  # the file holds width-8 tensors
    code, err = _generate(checkpoint, tmp_path, capsys)
    assert code == 2 and "does not match config.json" in err and "expected" in err
    _edit_config(checkpoint, width=8)
    tensors = load_file(str(checkpoint / "model.safetensors"))
    tensors["extra.weight"] = torch.zeros(3)
    tensors = {k: (v.double() if k == next(iter(tensors)) else v) for k, v in tensors.items()}
    save_file(tensors, str(checkpoint / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected \['extra.weight'\]"):
        load_generator(checkpoint)
    (checkpoint / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_generator(checkpoint)
    (checkpoint / "config.json").write_text('{"format": "aigc-ray-checkpoint/1", "model": {')
    code, err = _generate(checkpoint, tmp_path, capsys)
    assert code == 2 and "not valid JSON" in err


def test_nan_weights_are_refused(checkpoint, tmp_path, capsys):
    tensors = load_file(str(checkpoint / "model.safetensors"))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name][0] = float("nan")
    save_file(tensors, str(checkpoint / "model.safetensors"))
    code, err = _generate(checkpoint, tmp_path, capsys)
    assert code == 2 and f"non-finite values (NaN/Inf) in ['{name}']" in err
    assert not (tmp_path / "g.png").exists()


def test_eval_never_prepares_or_writes_where_a_checkpoint_says(checkpoint, tmp_path, capsys):
    """The checkpoint names a folder to read and a data_root to write the prepared copy to."""
    secret, target = tmp_path / "secret", tmp_path / "written-by-checkpoint"
    secret.mkdir()
    meta = json.loads((checkpoint / "config.json").read_text())
    meta["experiment"]["data"].update(dataset=f"folder:{secret}", data_root=str(target))
    meta["dataset"]["prepared"] = str(target / "prepared" / "x")
    (checkpoint / "config.json").write_text(json.dumps(meta))
    cache = tmp_path / "cache"
    code = main(["eval", "--checkpoint", str(checkpoint), "--data-root", str(cache), "--no-card"])
    err = capsys.readouterr().err
    assert code == 2 and f"no prepared dataset with content hash {'ab' * 6} under {cache}/prepared" in err
    assert "--dataset" in err
    assert not target.exists() and not cache.exists()


def test_a_sweeps_best_checkpoint_exports_to_a_uri(checkpoint, tmp_path, monkeypatch):
    """`aigc-ray tune --out URI` (README): best/ lands at the URI, not in a local directory named 's3:'."""
    from aigc_ray.tuning import sweep

    monkeypatch.chdir(tmp_path)
    write_card(checkpoint, {"format": "aigc-ray-card/2", "metrics": {"fid": 2.0}})
    dest, card = sweep.export_best(None, str(checkpoint), f"file://{tmp_path}/out/best")
    assert card == {"format": "aigc-ray-card/2", "metrics": {"fid": 2.0}} and dest == f"file://{tmp_path}/out/best"
    assert sorted(p.name for p in (tmp_path / "out" / "best").iterdir()) == sorted(p.name for p in checkpoint.iterdir())
    assert not (tmp_path / "file:").exists()
