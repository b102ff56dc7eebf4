"""ASHA whose rungs survive ``aigc-ray tune --resume``.

``Tuner.restore`` brings back the trials and the searcher, not the scheduler: Tune unpickles
the scheduler from ``tuner.pkl`` as it was built, with empty rungs (Ray 2.60 never calls a
scheduler's ``save``/``restore``). A resumed ASHA sweep then lets the next trial to reach each
rung through unopposed, whatever its score. This one writes its rungs to a JSON file beside
the experiment after every decision, and reads them back before its first decision after a
restore.
"""

from __future__ import annotations

from ray.tune.schedulers import AsyncHyperBandScheduler

from aigc_ray import storage


class ResumableASHA(AsyncHyperBandScheduler):
    def __init__(self, state_path: str, **kwargs):
        super().__init__(**kwargs)
        self.state_path = state_path  # <experiment>/asha_rungs.json
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        state = storage.read_json(self.state_path)  # None: absent, or torn (warned)
        if not isinstance(state, dict) or not {"rungs", "trial_brackets", "num_stopped"} <= set(state):
            if state is not None:
                storage.warn(f"{self.state_path} is not ASHA's state; starting with empty rungs")
            return
        for bracket, saved_rungs in zip(self._brackets, state["rungs"]):
            for (_milestone, recorded), saved in zip(bracket._rungs, saved_rungs):
                recorded.update(saved)
        # a trial that was running keeps the bracket it was placed in
        self._trial_info.update({trial_id: self._brackets[i] for trial_id, i in state["trial_brackets"].items()})
        self._num_stopped = state["num_stopped"]

    def _save(self) -> None:
        state = {"rungs": [[recorded for _milestone, recorded in bracket._rungs] for bracket in self._brackets],
                 "trial_brackets": {trial_id: self._brackets.index(bracket)
                                    for trial_id, bracket in self._trial_info.items()},
                 "num_stopped": self._num_stopped}
        storage.write_json(self.state_path, state, indent=None)

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()
        if trial.trial_id not in self._trial_info:
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._load()
        super().on_trial_remove(tune_controller, trial)
        self._save()
