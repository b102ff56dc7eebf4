"""The sweep's view of the domain-FID evaluation (aigc_ray.eval, issue 3).

ASHA/FIFO trials score evaluated epochs inline in the training loop, so the FID reaches Tune
with its epoch's report (``build_trainer(inline_eval=True)``). PBT segments keep Train V2's
asynchronous validation task (``for_tune``); the segment's scores are reported with its Tune
checkpoint.
"""

from __future__ import annotations

import importlib
import time


def _evaluate_fn():
    try:
        module = importlib.import_module("aigc_ray.eval")
    except ImportError as err:  # pragma: no cover - the package ships with aigc_ray
        return None, f"aigc_ray.eval can't be imported ({err})"
    fn = getattr(module, "evaluate_checkpoint", None)
    if fn is None:
        try:
            fn = importlib.import_module("aigc_ray.eval.quality").evaluate_checkpoint
        except (ImportError, AttributeError):
            return None, "aigc_ray.eval.evaluate_checkpoint is missing"
    return fn, ""


def unavailable() -> str:
    """Empty when checkpoints can be scored; otherwise what is missing."""
    return _evaluate_fn()[1]


def score_checkpoint(directory: str, num_samples: int | None = None, seed: int = 0, write_card: bool = False) -> dict:
    """FID, KID, floor and ratio of a local checkpoint directory (a trial's own)."""
    fn, missing = _evaluate_fn()
    if fn is None:
        raise RuntimeError(missing)
    return dict(fn(directory, num_samples=num_samples, seed=seed, write_card=write_card, own_checkpoint=True))


def _queue():
    """The queue Train's TuneReportCallback also uses: what is put on it becomes a Tune result
    (read by the trial's session while the trial function runs)."""
    from ray.train._internal.session import get_session

    return get_session()._get_or_create_inter_actor_queue()


def wait_until_forwarded(timeout_s: float = 120.0) -> None:
    """Block until the trial's session has taken every queued score (see driver.run_trial)."""
    queue, deadline = _queue(), time.monotonic() + timeout_s
    while not queue.empty():
        if time.monotonic() > deadline:
            print(f"warning: a score was not forwarded to Tune within {timeout_s:.0f}s", flush=True)
            return
        time.sleep(0.05)


def for_tune(config):
    """The trainer's ValidationConfig, adapted to run inside a Tune trial (a PBT segment, whose
    scores land in the run's checkpoint metrics and are reported with its Tune checkpoint)."""
    import ray.train

    # the trial's placement group holds only the driver's token CPU: schedule the scoring
    # task on the cluster at large, or it can never start
    remote = dict(config.ray_remote_kwargs) | {"scheduling_strategy": "DEFAULT"}
    return ray.train.ValidationConfig(config.fn, task_config=config.task_config, ray_remote_kwargs=remote)
