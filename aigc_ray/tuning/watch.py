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


RELEASE_GRACE_S = 10.0  # after a trial ends: time for its controller to finish or die on its own
RELEASE_LATEST_S = 120.0  # after a trial ends: its placement group is released even if a worker lingers


def _actor_dead(actor_id: str | None) -> bool:
    """Whether the GCS has the actor as dead (or has never heard of it). Read from the GCS
    directly (ray._private.state, Ray's own debugging accessor), not through the state API,
    which needs the dashboard and an address lookup: the very things that fail here."""
    if not actor_id:
        return True
    try:
        from ray._private.state import actors

        info = actors(actor_id=actor_id) or {}
    except Exception:  # noqa: BLE001 - unknown: treat as alive, decide later
        return False
    return not info or info.get("State") == "DEAD"


def release_placement(record: str, force: bool = False) -> tuple[bool, str | None]:
    """Settle the placement group recorded at ``record``: (settled, id it removed). It is
    removed only once the run's rank-0 worker is dead (its controller then is too, or is
    between attempts), or with ``force``: removing it under a live controller would only make
    Train retry the worker group."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    info = storage.read_json(record) if storage.exists(record) else None
    pg_hex = (info or {}).get("placement_group")
    if not pg_hex:
        return True, None
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex)))
    try:
        if placement_group_table(pg).get("state") in (None, "REMOVED"):
            return True, None
        if not force and not _actor_dead(info.get("worker")):
            return False, None
        remove_placement_group(pg)
    except Exception as err:  # noqa: BLE001 - removed meanwhile (by Train's own cleaner): fine
        print(f"warning: could not release placement group {pg_hex[:12]} ({err})", file=sys.stderr, flush=True)
        return True, None
    return True, pg_hex


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
        self.ended: dict[str, float] = {}  # trial id -> when it ended, until its placement group is settled
        self.next_settle = 0.0

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" in result:
            self.epoch[trial.trial_id] = result["epoch"]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = time.monotonic()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = time.monotonic()

    def _settle(self, now: float) -> None:
        """Release the placement groups of ended trials whose controllers died without doing so."""
        for trial_id, ended in list(self.ended.items()):
            if now - ended < RELEASE_GRACE_S:
                continue
            settled, released = release_placement(placement_record(self.train_storage, trial_id),
                                                  force=now - ended >= RELEASE_LATEST_S)
            if settled:
                del self.ended[trial_id]
            if released:
                print(f"[{trial_id}] released its workers' placement group {released[:12]}: its Train controller "
                      "ended with the trial without removing it", file=sys.stderr, flush=True)

    def on_experiment_end(self, trials, **info):
        """The last trials' placement groups, before run_sweep returns (a process that runs
        another sweep next must find the cluster free)."""
        deadline = time.monotonic() + RELEASE_LATEST_S
        while self.ended and time.monotonic() < deadline:
            self._settle(time.monotonic() + RELEASE_GRACE_S)  # no grace: the trials are over
            if self.ended:
                time.sleep(0.5)
        if self.ended:
            self._settle(float("inf"))

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if self.ended and now >= self.next_settle:
            self.next_settle = now + 2.0
            self._settle(now)
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
