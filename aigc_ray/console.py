"""What a command's console shows. By default: our own lines (epochs, trial reports, the
checkpoint) and Ray's warnings that matter. Ray's INFO lines ("Started a local Ray instance",
its workers' and controllers' INFO logs) and its token-auth notice, printed on every start,
only with `-v` (``aigc-ray -v COMMAND`` or ``aigc-ray COMMAND -v``).

The choice travels in the environment (AIGC_RAY_VERBOSE) so the Ray workers a command starts
(Train workers and controllers, Serve replicas) inherit it with the rest of the driver's
environment on a local Ray."""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "AIGC_RAY_VERBOSE"
# Ray 2.60 logs this notice at WARNING on every local start when RAY_AUTH_MODE is unset; it is
# not a problem of the run, and `aigc-ray serve` has its own (bearer-token) check
_RAY_NOTICE_LOGGERS = ("ray._private.authentication.authentication_token_setup",)


def set_verbose(verbose: bool) -> None:
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    quiet_ray_loggers()


def verbose() -> bool:
    """True unless a command chose a quiet console (the library, used from Python, stays as Ray is)."""
    return os.environ.get(VERBOSE_ENV, "1") != "0"


def quiet_ray_loggers() -> None:
    level = logging.NOTSET if verbose() else logging.ERROR
    for name in _RAY_NOTICE_LOGGERS:
        logging.getLogger(name).setLevel(level)


def ray_init_kwargs() -> dict:
    """Extra ``ray.init`` arguments for the chosen console: Ray's own INFO logs (driver and workers) off."""
    if verbose():
        return {}
    import ray

    return {"logging_level": logging.WARNING, "logging_config": ray.LoggingConfig(log_level="WARNING")}
