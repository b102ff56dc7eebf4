"""The sweep's watch, on the Tune driver: a status line at least every minute, and the release of
each trial's Train placement group as soon as the trial ends.

Why the release (issue 15's hang): Tune ends an ASHA trial by stopping its trial actor, which
owns the trial's Train controller, so the controller dies with it (fate-sharing) before it can
remove its workers' placement group. This happens to *every* ASHA trial: a pruned one, and one
at max_t too, since ASHA stops it on its last report while Train is still shutting down. A
placement group outlives the actor that created it while its job (the sweep's driver) lives;
Train's only cleanup is its PlacementGroupCleaner, which polls the controller through the state
API with an auto-detected cluster address: with a second Ray instance on the machine that lookup
raises ("Found multiple active Ray instances"), the cleaner's thread dies, and the placement
group (a CPU) is held until the sweep ends. The next trial's workers still fit, but its Ray
Data read tasks (1 CPU each) never get one, and the trial waits for ever without a word. So the
driver removes the trial's placement group itself, by the id the trial's rank-0 worker
recorded (train/waits.record_placement): no dashboard, no address lookup, no polling.
"""

from __future__ import annotations

import sys
import time

import ray.tune

from aigc_ray import storage
from aigc_ray.train.waits import placement_labels


def placement_record(train_storage: str, trial_id: str) -> str:
    """Where a trial's current Train run records its workers' placement group."""
    return storage.join(train_storage, "placement", f"{trial_id}.json")


def release_placement(record: str) -> str | None:
    """Remove the placement group recorded at ``record`` unless it is gone already; return its
    id when it was still held (a run whose controller died without removing it)."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    if not storage.exists(record):
        return None
    pg_hex = (storage.read_json(record) or {}).get("placement_group")
    if not pg_hex:
        return None
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex)))
    try:
        if placement_group_table(pg).get("state") in (None, "REMOVED"):
            return None
        remove_placement_group(pg)
    except Exception as err:  # noqa: BLE001 - removed meanwhile (by Train's own cleaner): fine
        print(f"warning: could not release placement group {pg_hex[:12]} ({err})", file=sys.stderr, flush=True)
        return None
    return pg_hex


def _age(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class SweepWatch(ray.tune.Callback):
    """A status line every ``every_s`` seconds (running trials and their last epoch, or how
    long they have been starting; waiting, finished and failed counts; free CPUs), and each
    ended trial's placement group released (see the module's docstring)."""

    def __init__(self, name: str, train_storage: str, every_s: float):
        self.name, self.train_storage, self.every_s = name, train_storage, every_s
        self.setup()

    def setup(self, **info):  # also on a restore (the callback is unpickled from another process)
        self.began = time.monotonic()
        self.next_line = self.began + self.every_s
        self.started: dict[str, float] = {}
        self.epoch: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" in result:
            self.epoch[trial.trial_id] = result["epoch"]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)

    def _release(self, trial) -> None:
        released = release_placement(placement_record(self.train_storage, trial.trial_id))
        if released:
            print(f"[{trial.trial_id}] released its workers' placement group {released[:12]} (its Train "
                  "controller ended with the trial)", file=sys.stderr, flush=True)

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now >= self.next_line:
            self.next_line = now + self.every_s
            print(self.status_line(trials, now), file=sys.stderr, flush=True)

    def status_line(self, trials, now: float) -> str:
        by_status: dict[str, list] = {}
        for trial in trials:
            by_status.setdefault(trial.status, []).append(trial)
        running = []
        for trial in by_status.get("RUNNING", []):
            if trial.trial_id in self.epoch:
                running.append(f"{trial.trial_id} epoch {self.epoch[trial.trial_id]:g}")
            else:
                running.append(f"{trial.trial_id} starting for {_age(now - self.started.get(trial.trial_id, now))}")
        try:
            free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
            cpus = f"; CPU {free:g} free of {total:g}"
        except Exception:  # noqa: BLE001 - the line goes out without it
            cpus = ""
        return (f"sweep {self.name} at {_age(now - self.began)}: running {len(running)}"
                + (f" ({', '.join(running)})" if running else "")
                + f", waiting {len(by_status.get('PENDING', [])) + len(by_status.get('PAUSED', []))}"
                + f", finished {len(by_status.get('TERMINATED', []))}, failed {len(by_status.get('ERROR', []))}{cpus}")


def labels(train_storage: str) -> dict[str, str]:
    """Placement group id -> "trial T's workers", for the sweep's trials (local storage)."""
    return placement_labels(storage.join(train_storage, "placement"))
