"""Where each model's last-known-good checkpoint is kept: Ray's GCS key-value store.

Every replica of every node reads the same GCS, so a replica started later (restart after a kill, autoscaling,
another node) finds what an earlier one recorded; the GCS is also where Serve keeps its own application state,
so the record lives exactly as long as the deployment it belongs to (across head restarts with GCS fault
tolerance). A file beside the checkpoints would need a writable shared store the checkpoints may not have
(read-only buckets), and a detached actor is a process that dies with its node.

Record: {"checkpoint": URI, "version": model version}, written only after the checkpoint loaded and passed
its test forward pass. The same store keeps, in their own namespaces, the state of a running canary
(serving/canary.py) and the arguments `aigc-ray serve` deployed its app with (serving/rollout.py), for the
same reason: they must outlive any one replica.
"""

from __future__ import annotations

import json
import logging

NAMESPACE = "aigc_serve_lkg"
logger = logging.getLogger("ray.serve")


def remember(key: str, record: dict, namespace: str = NAMESPACE) -> None:
    from ray.experimental import internal_kv

    try:
        internal_kv._internal_kv_put(key.encode(), json.dumps(record).encode(), overwrite=True, namespace=namespace)
    except Exception as err:  # serving goes on; only the fallback of later replicas is lost
        logger.error("%s %s: not recorded (%s: %s)", namespace, key, type(err).__name__, err)


def forget(key: str, namespace: str = NAMESPACE) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key.encode(), namespace=namespace)


def recall(key: str, namespace: str = NAMESPACE) -> dict | None:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(key.encode(), namespace=namespace)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
