"""Background priority for evaluation workers. Imports nothing heavy: ``aigc_ray/__init__.py``
calls ``run_in_background`` in an evaluation worker before the task's own imports (torch, the
feature net: about 10 s of CPU on this machine), which would otherwise compete with training at
normal priority."""

from __future__ import annotations

import os
import threading


def run_in_background() -> None:
    """Make the calling thread a background job: SCHED_IDLE (Linux), which runs only on CPU time
    no normal thread wants; the lowest nice where there is none. Linux schedules threads, not
    processes: threads this one starts later (torch's pools) inherit it, Ray's own threads in
    the process keep theirs. It can't be undone without privileges, which is why the task runs
    in worker processes of its own (the runtime_env in train/validation.py)."""
    tid = threading.get_native_id()
    try:
        if hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        else:  # pragma: no cover - not Linux
            os.setpriority(os.PRIO_PROCESS, tid, 19)
    except OSError as err:  # pragma: no cover - a sandbox that forbids it: score at normal priority
        print(f"eval: could not lower the evaluation's priority: {err}")
