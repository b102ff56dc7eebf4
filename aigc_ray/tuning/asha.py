"""ASHA whose rungs survive ``aigc-ray tune --resume``.

``Tuner.restore`` brings back the trials and the searcher, not the scheduler: Tune unpickles
the scheduler from ``tuner.pkl`` as it was built, with empty rungs (Ray 2.60 never calls a
scheduler's ``save``/``restore``). A resumed ASHA sweep then lets the next trial to reach each
rung through unopposed, whatever its score. This one writes its rungs to a JSON file beside
the experiment after every decision, and reads them back before its first decision after a
restore.

``min_rung_results`` (above 1) also fixes ASHA's first-come bias: Tune's ASHA judges a trial
against the results its rung holds when it arrives, so the first trials to reach a rung pass it
unopposed (the very first against nothing). Here a rung stops no one until it holds that many
results, and a trial is judged again at every report, at the highest rung of its own with enough
results, against everything that rung holds by then: a trial that passed a rung early is stopped
once later arrivals show it is not in the top 1/reduction_factor.
"""

from __future__ import annotations

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from aigc_ray import storage


class ResumableASHA(AsyncHyperBandScheduler):
    def __init__(self, state_path: str, min_rung_results: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.state_path = state_path  # <experiment>/asha_rungs.json
        self.min_rung_results = min_rung_results
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
        if self.min_rung_results <= 1 or self._time_attr not in result or self._metric not in result \
                or (result[self._time_attr] >= self._max_t and self._stop_last_trials):
            action = super().on_trial_result(tune_controller, trial, result)
        else:
            action = self._judge(self._trial_info[trial.trial_id], trial.trial_id, result[self._time_attr],
                                 self._metric_op * result[self._metric])
            self._num_stopped += action == TrialScheduler.STOP
        self._save()
        return action

    def _judge(self, bracket, trial_id: str, epoch: float, reward: float) -> str:
        """Record the result at the rung it reaches (as ASHA does), then judge the trial at its
        highest rung that holds min_rung_results results. Rewards: higher is better."""
        for milestone, recorded in bracket._rungs:  # highest milestone first
            if epoch >= milestone and trial_id not in recorded:
                recorded[trial_id] = reward
                break
        for _milestone, recorded in bracket._rungs:
            if trial_id in recorded and len(recorded) >= self.min_rung_results:
                cutoff = bracket.cutoff(recorded)
                return TrialScheduler.STOP if recorded[trial_id] < cutoff else TrialScheduler.CONTINUE
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._load()
        super().on_trial_remove(tune_controller, trial)
        self._save()
