"""aigc-ray: train, tune, evaluate and serve image generators on Ray."""

import os as _os
from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _installed_version

try:
    __version__ = _installed_version("aigc-ray")  # pyproject.toml's, as installed: one place for it
except _NotInstalled:  # a source tree that was never installed
    __version__ = "0+unknown"

if _os.environ.get("AIGC_RAY_EVAL_WORKER") == "background":
    # A training run's evaluation worker (its runtime_env sets this, train/validation.py): lower its
    # priority before anything heavy is imported. Its first task's imports (torch, the feature net:
    # ~10 s of CPU here) would otherwise compete with training at normal priority. (Ray's
    # worker_process_setup_hook would be the place, but 2.60 runs it for ray.init's runtime_env only.)
    from aigc_ray.train.background import run_in_background as _run_in_background

    _run_in_background()
