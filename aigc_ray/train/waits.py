"""Bounded waits for a run's start, and what to say when one runs out.

A Train run starts in three waits. Its Parquet dataset is opened in the driver, which samples
the files with Ray tasks (``call_within`` bounds it); its workers' placement group must be placed (Ray Train's
``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``; ``build_trainer(start_timeout_s=...)`` sets it and
makes the timeout final instead of retried forever), then its data pipeline must produce a
first batch (``first_batch_within``). Past any bound the run fails with ``StartTimeout``,
whose message names what it waited for (``describe_wait``): the resources it needs, what the
cluster has free, and who holds the rest, read from the GCS placement group table (no
dashboard needed). Placement groups are named after the sweep trial that owns them when that
trial recorded them (``record_placement``, read back by ``placement_labels``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from aigc_ray import storage


class StartTimeout(RuntimeError):
    """A run's workers or data could not start within the bound."""


def _fmt_resources(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if not k.startswith(("bundle_group", "node:", "memory",
                                                                    "object_store_memory"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def _bundle_totals(bundles: dict) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles.values():
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def record_placement(path: str, trial: str) -> None:
    """Rank 0 of a run: write the placement group its workers run in to ``path`` (a JSON file),
    so the sweep can name it and, once the trial ends, release it (tuning/watch.py)."""
    import ray.util

    pg = ray.util.get_current_placement_group()
    if pg is not None:  # with this worker's actor id: once it is dead, so is the run's controller
        storage.write_json(path, {"placement_group": pg.id.hex(), "trial": trial,
                                  "worker": ray.get_runtime_context().get_actor_id()})


def placement_labels(directory: str | None) -> dict[str, str]:
    """{placement group id (hex): "trial T's workers"} from the records in ``directory`` (local
    paths only: an object store is not listed)."""
    import os

    labels: dict[str, str] = {}
    if not directory or storage.is_uri(directory) or not os.path.isdir(directory):
        return labels
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        record = storage.read_json(os.path.join(directory, name))
        if isinstance(record, dict) and record.get("placement_group"):
            labels[record["placement_group"]] = f"trial {record.get('trial') or name[:-5]}'s workers"
    return labels


def describe_wait(need: dict[str, float], waited_for: str, labels: dict[str, str] | None = None) -> str:
    """'<waited_for> needs {CPU: 1}; the cluster has {CPU: 0.99} free of {CPU: 3}; held by: ...'."""
    import ray
    import ray.util

    labels = labels or {}
    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        table = ray.util.placement_group_table()
    except Exception as err:  # noqa: BLE001 - a diagnosis must never hide the timeout itself
        return f"{waited_for} needs {_fmt_resources(need)} (the cluster's state could not be read: {err})"
    keys = set(need) or {"CPU"}
    holders, in_groups = [], {k: 0.0 for k in keys}
    for pg_id, info in table.items():
        if info.get("state") not in ("CREATED", "RESCHEDULING", "PREPARED"):
            continue
        held = {k: v for k, v in _bundle_totals(info.get("bundles", {})).items() if k in keys and v}
        if not held:
            continue
        for k, v in held.items():
            in_groups[k] += v
        who = labels.get(pg_id) or (info.get("name") or "no trial of this sweep (a finished or stopped run's?)")
        holders.append(f"placement group {pg_id[:12]} {_fmt_resources(held)}: {who}")
    pending = sum(1 for info in table.values() if info.get("state") == "PENDING")
    outside = {k: max(0.0, total.get(k, 0.0) - free.get(k, 0.0) - in_groups[k]) for k in keys}
    if any(v > 1e-9 for v in outside.values()):
        holders.append(f"tasks and actors outside placement groups {_fmt_resources(outside)}")
    free_now = _fmt_resources({k: free.get(k, 0.0) for k in keys})
    text = (f"{waited_for} needs {_fmt_resources(need)}; the cluster has {free_now} free of "
            f"{_fmt_resources({k: total.get(k, 0.0) for k in keys})}")
    if pending:
        text += f"; {pending} placement group(s) pending"
    return text + ("; held by: " + "; ".join(holders) if holders else "")


def call_within(fn: Callable[[], Any], timeout_s: float | None, describe: Callable[[], str]) -> Any:
    """``fn()``, run on a helper thread: its result (or its exception), or ``StartTimeout(describe())``
    once ``timeout_s`` pass. (A Ray task with no CPU to run on waits forever, without a word; the
    helper thread is left to that wait, and ends with its process.)"""
    if not timeout_s:
        return fn()
    box: queue.Queue = queue.Queue(maxsize=1)

    def run() -> None:
        try:
            box.put((True, fn()))
        except BaseException as err:  # noqa: BLE001 - handed to the caller as is (StopIteration too)
            box.put((False, err))

    threading.Thread(target=run, name="bounded-start", daemon=True).start()
    try:
        ok, value = box.get(timeout=timeout_s)
    except queue.Empty:
        raise StartTimeout(describe()) from None
    if not ok:
        raise value
    return value


def first_batch_within(batches: Iterator[Any], timeout_s: float | None, describe) -> Iterator[Any]:
    """``batches`` unchanged, except that the first one must arrive within ``timeout_s``, or
    ``StartTimeout(describe())`` is raised (``call_within``)."""
    it = iter(batches)
    try:
        first = call_within(lambda: next(it), timeout_s, describe)
    except StopIteration:
        return
    yield first
    yield from it
