"""Quality-gated promotion: the comparison rule (pure) and `aigc-ray promote` on real checkpoints. No Ray."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_export import make_checkpoint

from aigc_ray.cli import main as cli_main
from aigc_ray.promotion import (
    PromotionError,
    ProtocolMismatch,
    compare_cards,
    side_by_side,
    sweep_candidate,
)

HASH = "8d80d48128cf3bdaf72d32aff8490588664ef39cc8b1e11d2979246890cae813"


NOISE = (-0.2, 0.1, 0.3, -0.1, -0.1)  # what the draws of one seed share, draw by draw (mean 0)


def card(fid: float, version: str = "dcgan-s1-aaaa", noise=NOISE, fmt="aigc-ray-card/2", **protocol) -> dict:
    """A card as aigc-ray eval writes it: each metric the mean of its draws, with their interval."""
    p = {"dataset": "digits", "content_hash": HASH, "num_samples": 64, "draws": len(noise), "seed": 0, **protocol}
    metrics = {"fid": fid, "kid": fid / 10, "kid_std": 0.1, "precision": 0.5}
    c = {"format": fmt, "model_version": version, "lower_is_better": ["fid", "kid"], "metrics": metrics,
         "floor": {"fid": 4.0, "kid": 0.0, "kid_std": 0.1, "precision": 1.0}, "protocol": p}
    if fmt == "aigc-ray-card/2":
        set_metric(c, "kid", fid / 10, [n / 10 for n in noise])
        set_metric(c, "precision", 0.5, [n / 10 for n in noise])
        set_metric(c, "fid", fid, noise)
    return c


def set_metric(c: dict, name: str, mean: float, noise=NOISE) -> dict:
    c.setdefault("draws", {})[name] = [mean + n for n in noise]
    c["metrics"][name] = mean
    spread = max(abs(n) for n in noise)
    c.setdefault("intervals", {})[name] = [mean - spread, mean + spread]
    return c


def test_better_by_the_margin_is_promoted_worse_or_marginal_is_refused():
    v = compare_cards(card(20.0), card(10.0), min_gain=0.05)
    assert v.promote and v.gain == pytest.approx(0.5) and "better by +50.0%" in v.reason
    v = compare_cards(card(20.0), card(19.5), min_gain=0.05)  # 2.5% better: not enough
    assert not v.promote and v.gain == pytest.approx(0.025) and "below the required 5.0%" in v.reason
    v = compare_cards(card(20.0), card(25.0))
    assert not v.promote and v.gain < 0 and "not better" in v.reason
    # worse on every draw: said so, not called noise
    assert v.gain_interval[1] < 0 and "worse beyond noise" in v.reason and "within noise" not in v.reason
    assert compare_cards(card(20.0), card(19.5), min_gain=0.0).promote
    # higher-is-better metric: the direction flips
    hi, lo = card(20.0), card(20.0)
    set_metric(hi, "precision", 0.9, [n / 10 for n in NOISE])
    set_metric(lo, "precision", 0.5, [n / 10 for n in NOISE])
    assert compare_cards(lo, hi, metric="precision").promote and not compare_cards(hi, lo, metric="precision").promote


def test_a_gain_within_the_draws_noise_is_refused_with_both_intervals():
    # 5% better on average, but the draws disagree by +-30%: the paired interval reaches below 0
    served, candidate = card(20.0, noise=(-3, 3, -3, 3, 0)), card(19.0, noise=(3, -3, 3, -3, 0))
    v = compare_cards(served, candidate, min_gain=0.0)
    lo, hi = v.gain_interval
    assert not v.promote and v.gain == pytest.approx(0.05) and lo < 0 < hi
    assert "within noise" in v.reason and "[17, 23]" in v.reason and "[16, 22]" in v.reason
    # the same mean gain on draws that agree is beyond noise
    assert compare_cards(card(20.0), card(19.0), min_gain=0.0).promote
    # a card without its per-draw values can't be paired
    bare = card(19.0)
    del bare["draws"]
    with pytest.raises(PromotionError, match="no per-draw 'fid' values"):
        compare_cards(card(20.0), bare)


def test_a_card_of_the_old_single_draw_protocol_is_not_compared_with_a_new_one():
    old = card(20.0, fmt="aigc-ray-card/1")
    with pytest.raises(ProtocolMismatch) as err:  # served card old: re-score the served checkpoint
        compare_cards(old, card(10.0))
    assert not err.value.rescorable and "re-score the served checkpoint" in str(err.value)
    with pytest.raises(ProtocolMismatch) as err:  # candidate card old: the CLI re-scores the candidate
        compare_cards(card(20.0), card(10.0, fmt="aigc-ray-card/1"))
    assert err.value.rescorable and "re-score the candidate" in str(err.value)


def test_cards_on_another_protocol_are_not_compared():
    with pytest.raises(ProtocolMismatch) as err:
        compare_cards(card(20.0), card(1.0, content_hash="f" * 64, dataset="mnist"))
    assert not err.value.rescorable
    assert "dataset: served 'digits' vs candidate 'mnist'" in str(err.value) and "content_hash" in str(err.value)
    assert "another dataset" in str(err.value)
    with pytest.raises(ProtocolMismatch) as err:
        compare_cards(card(20.0), card(1.0, num_samples=128, seed=3))
    assert err.value.rescorable and {f for f, _, _ in err.value.differences} == {"num_samples", "seed"}
    with pytest.raises(PromotionError, match=r"metric: the candidate card has no 'precision' \(it has: fid\)"):
        compare_cards(card(20.0), {**card(1.0), "metrics": {"fid": 1.0}}, metric="precision")
    with pytest.raises(PromotionError, match="min_gain"):
        compare_cards(card(20.0), card(1.0), min_gain=-1)


def test_side_by_side_shows_both_cards():
    text = side_by_side(card(20.0, "dcgan-s1-old"), card(25.0, "dcgan-s9-new"))
    assert "dcgan-s1-old" in text and "dcgan-s9-new" in text
    fid = next(line for line in text.splitlines() if line.startswith("fid"))
    assert "20 [19.7, 20.3]" in fid and "25 [24.7, 25.3]" in fid and fid.split()[-2:] == ["4", "-25.0%"]
    assert "kid_std" not in text and "5 draws of 64 samples of digits" in text


def _checkpoint(tmp_path, name: str, fid: float, **protocol):
    c = card(fid, version=name, **protocol)
    return str(make_checkpoint(tmp_path / name, "dcgan", card=c)), c


def test_cli_promote_refuses_a_worse_candidate_and_accepts_a_better_one(tmp_path, capsys):
    served, _ = _checkpoint(tmp_path, "served", 20.0)
    worse, _ = _checkpoint(tmp_path, "worse", 24.0)
    better, _ = _checkpoint(tmp_path, "better", 12.0)
    assert cli_main(["promote", "--model", "digits", "--checkpoint", worse, "--served", served]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "served" in out and "worse" in out and "-20.0%" in out  # both cards side by side
    assert cli_main(["promote", "--model", "digits", "--checkpoint", better, "--served", served, "--gate-only"]) == 0
    assert "PROMOTE" in capsys.readouterr().out
    assert cli_main(["promote", "--model", "digits", "--checkpoint", better, "--served", served, "--min-gain", "0.5"]) == 1


def test_cli_promote_bad_input(tmp_path, capsys):
    served, _ = _checkpoint(tmp_path, "served", 20.0)
    other, _ = _checkpoint(tmp_path, "other", 1.0, content_hash="f" * 64, dataset="shapes")
    assert cli_main(["promote", "--model", "digits", "--checkpoint", other, "--served", served]) == 2
    err = capsys.readouterr().err
    assert "dataset: served 'digits' vs candidate 'shapes'" in err
    resampled, _ = _checkpoint(tmp_path, "resampled", 1.0, num_samples=128)
    assert cli_main(["promote", "--model", "digits", "--checkpoint", resampled, "--served", served,
                     "--no-rescore"]) == 2
    assert "num_samples: served 64 vs candidate 128" in capsys.readouterr().err
    bare = str(make_checkpoint(tmp_path / "bare", "dcgan"))
    assert cli_main(["promote", "--model", "digits", "--checkpoint", bare, "--served", served]) == 2
    assert "no quality card" in capsys.readouterr().err
    conditional = str(make_checkpoint(tmp_path / "cond", "dcgan", card=card(1.0), num_classes=3))
    assert cli_main(["promote", "--model", "digits", "--checkpoint", conditional, "--served", served]) == 2
    assert "num_classes 0 -> 3" in capsys.readouterr().err
    assert cli_main(["promote", "--model", "digits", "--sweep", str(tmp_path / "nosweep"), "--served", served]) == 2
    assert "no exported best checkpoint" in capsys.readouterr().err


def test_sweep_candidate_is_the_exported_best(tmp_path):
    best, _ = _checkpoint(tmp_path / "sweep", "best", 5.0)
    assert sweep_candidate(str(tmp_path / "sweep")) == best
    (tmp_path / "sweep" / "summary.json").write_text(json.dumps({"exported": "/elsewhere/best"}))
    assert sweep_candidate(str(tmp_path / "sweep")) == "/elsewhere/best"


def test_cli_promote_reads_the_served_card_over_http(tmp_path, capsys):
    served_card = card(20.0, "dcgan-s1-live")
    models = {"default": "digits", "models": [{"name": "digits", "version": "dcgan-s1-live", "card": served_card,
                                               "image_size": 8, "channels": 1, "num_classes": 0, "latent_dim": 8}]}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(models if self.path == "/v1/models" else {}).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        better, _ = _checkpoint(tmp_path, "better", 10.0)
        assert cli_main(["promote", "--model", "digits", "--checkpoint", better, "--url", url, "--gate-only"]) == 0
        assert "dcgan-s1-live" in capsys.readouterr().out
        assert cli_main(["promote", "--model", "faces", "--checkpoint", better, "--url", url]) == 2
        assert "serves no model 'faces' (it serves: digits)" in capsys.readouterr().err
        models["models"][0] = {**models["models"][0], "card": None}
        assert cli_main(["promote", "--model", "digits", "--checkpoint", better, "--url", url]) == 2
        assert "serves without a quality card" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()
    assert cli_main(["promote", "--model", "digits", "--checkpoint", better, "--url", url]) == 2
    assert "can't read" in capsys.readouterr().err



def test_cli_promote_rescores_a_candidate_measured_with_another_count_and_seed(tmp_path, data_root, capsys):
    """Real prepared digits and feature net: the candidate's card (100 samples, seed 3) is re-measured on
    the served card's protocol (64 samples, seed 0) before the comparison."""
    from test_eval import _prepared, _untrained_checkpoint

    from aigc_ray.data.prepare import read_manifest
    from aigc_ray.models.checkpoint import read_card, write_card

    cfg, prepared = _prepared(tmp_path, data_root)
    content_hash = read_manifest(prepared)["content_hash"]
    served, _ = _checkpoint(tmp_path, "served", 1e6, content_hash=content_hash)  # any real FID beats it
    candidate = _untrained_checkpoint(tmp_path / "candidate", cfg, prepared)
    write_card(candidate, card(1.0, "candidate", content_hash=content_hash, num_samples=100, seed=3))
    code = cli_main(["promote", "--model", "digits", "--checkpoint", candidate, "--served", served,
                     "--data-root", str(data_root), "--gate-only"])
    captured = capsys.readouterr()
    assert "re-scoring" in captured.err and "num_samples: served 64 vs candidate 100" in captured.err
    rescored = captured.out.split("candidate:")[-1]
    assert "5 draws of 64 samples of digits" in rescored and "seed 0" in rescored
    assert code == 0 and "PROMOTE" in captured.out
    assert read_card(candidate)["protocol"]["num_samples"] == 100  # the re-score is not written over its card


@pytest.mark.parametrize("argv,message", [
    (["--canary", "0"], "--canary: a percent"),
    (["--canary", "100"], "--canary: a percent"),
    (["--canary", "10", "--max-error-rate", "1.5"], "--max-error-rate"),
    (["--canary", "10", "--min-requests", "0"], "--min-requests"),
    (["--canary", "10", "--canary-timeout", "0"], "--canary-timeout"),
    (["--canary", "10", "--gate-only"], "--gate-only"),
])
def test_cli_promote_bad_rollout_flags_fail_before_anything(tmp_path, capsys, argv, message):
    served, _ = _checkpoint(tmp_path, "served", 20.0)
    better, _ = _checkpoint(tmp_path, "better", 10.0)
    assert cli_main(["promote", "--model", "digits", "--checkpoint", better, "--served", served, *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_promote_finish_and_rollback_take_no_candidate(tmp_path, capsys):
    assert cli_main(["promote", "--model", "digits"]) == 2
    assert "--checkpoint or --sweep" in capsys.readouterr().err
    assert cli_main(["promote", "--model", "digits", "--finish", "--canary", "10"]) == 2
    assert "--finish / --rollback" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one of --checkpoint, --sweep, --finish, --rollback
        cli_main(["promote", "--model", "digits", "--finish", "--rollback"])


# ---- text models: validation bits/byte paired over the same validation blocks ---------------------------

BLOCKS = [1.2, 2.9, 2.1, 1.6, 3.4, 2.4, 1.9, 2.7, 1.4, 3.0, 2.2, 2.6]  # blocks differ far more than models do


def tcard(values, block_size: int = 16, max_blocks: int = 0, dataset_hash: str = HASH) -> dict:
    """A text card as the text training loop writes it (aigc_ray.text_quality.text_card)."""
    import numpy as np

    from aigc_ray.text_quality import text_card

    floor = {"unigram": {"mean": 5.0, "lo": 4.9, "hi": 5.1}, "bigram": {"mean": 3.5, "lo": 3.4, "hi": 3.6}}
    return text_card(np.asarray(values, float), floor, dataset_hash=dataset_hash, block_size=block_size,
                     max_blocks=max_blocks)


def test_text_gate_pairs_the_blocks_and_needs_an_interval_below_zero_and_the_gain():
    from aigc_ray.promotion import compare_text_cards

    served = tcard(BLOCKS)
    wiggle = [0.02, -0.01, 0.0, 0.01, -0.02, 0.01, 0.0, -0.01, 0.02, -0.02, 0.0, 0.01]
    better = tcard([b - 0.25 + w for b, w in zip(BLOCKS, wiggle)])  # ~11% better on every block
    v = compare_text_cards(served, better, min_gain=0.05)
    assert v.promote and v.metric == "val_bpb" and v.gain == pytest.approx((0.25 - sum(wiggle) / 12) / (sum(BLOCKS) / 12))
    # unpaired, the two intervals overlap (blocks vary by +-1 bit); paired, the difference is far from 0
    assert better["metrics"]["val_bpb_hi"] > served["metrics"]["val_bpb_lo"]
    assert "paired over 12 validation blocks" in v.reason and "meets the required 5.0%" in v.reason
    v = compare_text_cards(served, tcard([b - 0.05 + w for b, w in zip(BLOCKS, wiggle)]))  # 2% better: too little
    assert not v.promote and "below the required 5.0%" in v.reason
    # 8% better on average, but half the blocks got worse: the interval reaches above 0
    mixed = tcard([b + (0.5 if i % 2 else -0.87) for i, b in enumerate(BLOCKS)])
    v = compare_text_cards(served, mixed, min_gain=0.0)
    assert not v.promote and v.gain > 0.05 and "within noise: that interval reaches 0" in v.reason
    worse = compare_text_cards(served, tcard([b + 0.25 + w for b, w in zip(BLOCKS, wiggle)]))  # worse on every block
    assert not worse.promote and "worse beyond noise" in worse.reason and "within noise" not in worse.reason
    s, m = served["metrics"], mixed["metrics"]  # both models' bits/byte with their intervals
    assert f"{s['val_bpb']:.4f} [{s['val_bpb_lo']:.4f}, {s['val_bpb_hi']:.4f}]" in v.reason
    assert f"{m['val_bpb']:.4f} [{m['val_bpb_lo']:.4f}, {m['val_bpb_hi']:.4f}]" in v.reason
    assert not compare_text_cards(served, tcard([b + 0.3 for b in BLOCKS])).promote  # worse


def test_text_cards_on_other_blocks_or_without_them_are_not_compared():
    from aigc_ray.promotion import compare_text_cards

    served = tcard(BLOCKS)
    with pytest.raises(PromotionError, match="block_size: served 16 vs candidate 32"):
        compare_text_cards(served, tcard(BLOCKS, block_size=32))
    with pytest.raises(PromotionError, match="dataset_hash"):
        compare_text_cards(served, tcard(BLOCKS, dataset_hash="f" * 64))
    old = {k: v for k, v in tcard(BLOCKS).items() if k not in ("per_block", "format")}  # a card from before
    with pytest.raises(PromotionError, match="no per-block values"):
        compare_text_cards(old, served)
    with pytest.raises(PromotionError, match="modality: the candidate card is not a text model's card"):
        compare_text_cards(served, card(10.0))


def _text_ckpt(tmp_path, name: str, values, seed: int = 0, **protocol) -> str:
    from test_text_export import text_checkpoint

    return str(text_checkpoint(tmp_path / name, card=tcard(values, **protocol), seed=seed))


def test_cli_promote_text_checkpoints(tmp_path, capsys):
    served = _text_ckpt(tmp_path, "served", BLOCKS)
    better = _text_ckpt(tmp_path, "better", [b * 0.8 for b in BLOCKS], seed=1)
    worse = _text_ckpt(tmp_path, "worse", [b + 0.01 * (i % 3) for i, b in enumerate(BLOCKS)], seed=2)
    assert cli_main(["promote", "--model", "text", "--checkpoint", better, "--served", served, "--gate-only"]) == 0
    out = capsys.readouterr().out
    assert "PROMOTE" in out and "better by +20.0%" in out and "gpt-s3-" in out and "bigram baseline" in out
    assert cli_main(["promote", "--model", "text", "--checkpoint", worse, "--served", served]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "val_bpb" in out and "nothing changed" in out
    assert cli_main(["promote", "--model", "text", "--checkpoint", better, "--served", served,
                     "--min-gain", "0.3"]) == 1
    assert "below the required 30.0%" in capsys.readouterr().out


def test_cli_promote_text_bad_input(tmp_path, capsys):
    served = _text_ckpt(tmp_path, "served", BLOCKS)
    better = _text_ckpt(tmp_path, "better", [b * 0.8 for b in BLOCKS], seed=1)
    image, _ = _checkpoint(tmp_path, "image", 10.0)

    def fails(*argv: str) -> str:
        assert cli_main(["promote", "--model", "m", *argv]) == 2
        return capsys.readouterr().err

    err = fails("--checkpoint", better, "--served", image)
    assert "modality: candidate" in err and "is a text model" in err and "serves an image model" in err
    err = fails("--checkpoint", image, "--served", served)
    assert "is an image model" in err and "serves a text model" in err
    assert "metric: a text model is judged on val_bpb" in fails("--checkpoint", better, "--served", served,
                                                               "--metric", "fid")
    other = _text_ckpt(tmp_path, "other", BLOCKS, block_size=32)
    err = fails("--checkpoint", other, "--served", served, "--no-rescore")
    assert "block_size: served 16 vs candidate 32" in err
    err = fails("--checkpoint", other, "--served", served, "--data-root", str(tmp_path / "nodata"))
    assert "re-scoring" in err and "dataset: no prepared text dataset with content hash" in err
    from pathlib import Path

    old = Path(served) / "card.json"  # a served card from before per-block values
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k not in ("per_block", "format")}))
    assert "per_block: the served card of m has no per-block" in fails("--checkpoint", better, "--served", served,
                                                                      "--no-rescore")


def test_cli_promote_rescores_a_text_candidate_on_the_served_blocks(tmp_path, capsys):
    """Real prepared text: the served card is scored on all validation blocks, the candidate's on a capped
    subset (another protocol); promote re-scores the candidate on the served card's blocks, then pairs them."""
    import numpy as np
    from test_text_export import text_checkpoint

    from aigc_ray.data.text import load_tokens, prepare_text
    from aigc_ray.models.text_checkpoint import load_text_model
    from aigc_ray.text_quality import model_block_bits

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 60)
    prepared = tmp_path / "prepared"
    manifest = prepare_text(f"text:{corpus}", prepared)
    val = np.asarray(load_tokens(prepared, "validation"))
    served_ckpt = text_checkpoint(tmp_path / "served", seed=0)
    per_block = model_block_bits(load_text_model(served_ckpt)[0], val, 16, "cpu")
    served = tcard(per_block + 1.0, dataset_hash=manifest["content_hash"])  # a served model 1 bit/byte worse
    (served_ckpt / "card.json").write_text(json.dumps(served))
    candidate = text_checkpoint(tmp_path / "candidate", seed=0,
                                card=tcard([1.0, 1.1], max_blocks=2, dataset_hash=manifest["content_hash"]))
    code = cli_main(["promote", "--model", "text", "--checkpoint", str(candidate), "--served", str(served_ckpt),
                     "--dataset", str(prepared), "--gate-only"])
    captured = capsys.readouterr()
    assert "re-scoring" in captured.err and "max_blocks: served 0 vs candidate 2" in captured.err
    assert code == 0 and "PROMOTE" in captured.out and f"paired over {len(per_block)} validation blocks" in captured.out
    assert json.loads((candidate / "card.json").read_text())["protocol"]["max_blocks"] == 2  # not written over


def test_cli_promote_reads_a_served_text_card_over_http(tmp_path, capsys):
    """GET /v1/models lists a text model (modality, vocab, its card without a version): the gate pairs it."""
    served_card = tcard(BLOCKS)
    models = {"default": "text", "models": [{"name": "text", "version": "gpt-s1-live", "modality": "text",
                                             "vocab": {"kind": "bytes", "size": 256}, "card": served_card}]}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(models).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        better = _text_ckpt(tmp_path, "better", [b * 0.8 for b in BLOCKS], seed=1)
        assert cli_main(["promote", "--model", "text", "--checkpoint", better, "--url", url, "--gate-only"]) == 0
        out = capsys.readouterr().out
        assert "gpt-s1-live" in out and "PROMOTE" in out
        image, _ = _checkpoint(tmp_path, "image", 10.0)
        assert cli_main(["promote", "--model", "text", "--checkpoint", image, "--url", url]) == 2
        assert "serves a text model" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()
