"""The canary's automatic rollback verdict (serving/canary.py `verdict`): a pure function of the counts and the
record's thresholds, tested without Ray."""

from __future__ import annotations

import math

import pytest

from aigc_ray.serving.canary import check_thresholds, difference, verdict, wilson


def test_too_few_requests_give_no_verdict():
    found = verdict(10, 19, 0.05, 20)
    assert found.kind == "waiting" and not found.rollback
    assert "19 of the min_requests 20" in found.reason and "too few" in found.reason
    assert verdict(0, 0, 0.05, 20).interval is None  # nothing seen yet: no interval either


def test_two_in_twenty_is_not_confidently_above_five_percent():
    found = verdict(2, 20, 0.05, 20)  # 10% observed, but its interval [2.8%, 30.1%] includes 5%
    assert found.kind == "within" and not found.rollback
    assert "95% Wilson [2.8%, 30.1%]" in found.reason and "not confidently above max_error_rate 5.0%" in found.reason


def test_fifteen_in_forty_rolls_back_with_the_interval_in_the_reason():
    found = verdict(15, 40, 0.05, 20, version="v2")
    assert found.rollback
    assert found.reason.startswith("automatic rollback: candidate v2 failed 15 of 40 requests "
                                   "(37.5%, 95% Wilson [24.2%, 53.0%] > max_error_rate 5.0%)"), found.reason
    assert found.interval[0] > 0.05
    assert "fewer than min_requests 20: not compared" in found.reason  # no current tally here


def test_the_example_of_the_docstring():
    found = verdict(9, 40, 0.05, 20, 1, 400, "v2", "v1")
    assert found.rollback
    assert "failed 9 of 40 requests (22.5%, 95% Wilson [12.3%, 37.5%] > max_error_rate 5.0%)" in found.reason
    assert "the current version v1 failed 1 of 400 (0.2%, 95% Wilson [0.0%, 1.4%])" in found.reason
    assert found.difference[0] > 0 and "Newcombe" in found.reason and found.reason.endswith("> 0)")


def test_a_current_version_failing_as_often_is_not_blamed_on_the_candidate():
    found = verdict(15, 40, 0.05, 20, 120, 400, "v2", "v1")  # candidate 37.5%, current 30%
    assert found.kind == "inconclusive" and not found.rollback
    assert "not rolled back" in found.reason and "automatic rollback" not in found.reason
    assert "the current version v1 failed 120 of 400" in found.reason and "includes 0" in found.reason
    assert found.current_interval is not None and found.difference[0] <= 0 <= found.difference[1]
    # the same candidate beside a healthy current version is rolled back
    assert verdict(15, 40, 0.05, 20, 2, 400, "v2", "v1").rollback


def test_a_current_version_with_too_few_requests_does_not_shield_the_candidate():
    found = verdict(15, 40, 0.05, 20, 5, 10)  # the current failed half of 10: too few to compare
    assert found.rollback and "answered 10 requests here, fewer than min_requests 20" in found.reason
    assert found.current_interval is None and found.difference is None


def test_the_difference_interval_is_less_strict_than_non_overlapping_intervals():
    """Candidate 8 of 60 vs current 20 of 400: the two Wilson intervals overlap, the difference's does not
    include 0; the verdict follows the difference (module docstring)."""
    lo, _ = wilson(8, 60)
    _, hi = wilson(20, 400)
    assert 0.05 < lo < hi  # the intervals overlap
    assert difference(8, 60, 20, 400)[0] > 0
    assert verdict(8, 60, 0.05, 20, 20, 400).rollback


def test_a_zero_threshold_rolls_back_on_failures_distinguishable_from_the_current():
    assert verdict(0, 100, 0.0, 20, 0, 1000).kind == "within"
    assert verdict(1, 100, 0.0, 20, 10, 1000).kind == "inconclusive"  # 1% beside a current failing 1%
    assert verdict(1, 100, 0.0, 20, 0, 1000).rollback  # beside a current that never failed


def test_a_candidate_that_stops_answering_is_rolled_back_after_a_few_failures():
    """As in test_rollout: 50% share, max_error_rate 0.01, min_requests 5; after s answers every candidate request
    fails and is answered again by the (healthy) current version."""
    for s in (5, 10, 20, 40):
        k = next(k for k in range(1, 100) if verdict(k, s + k, 0.01, 5, 0, s + 2 * k).rollback)
        assert k <= 6, (s, k)


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    (2, 20, 0.027866, 0.301034),  # the known value: 10% observed, [2.8%, 30.1%]
    (9, 40, 0.123161, 0.375031),
    (0, 20, 0.0, 0.161125),
    (20, 20, 0.838875, 1.0),
    (1, 400, 0.000441, 0.014023),
])
def test_wilson_bounds_match_known_values(k, n, lo, hi):
    assert wilson(k, n) == pytest.approx((lo, hi), abs=1e-6)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (2, 20), (3, 7), (15, 40), (1, 400), (37, 1000)])
def test_wilson_bounds_match_scipy(k, n):
    stats = pytest.importorskip("scipy.stats")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_the_difference_interval_matches_newcombe():
    """Newcombe (1998), Statistics in Medicine 17:873, method 10: 56/70 vs 48/80 -> [0.0524, 0.3339], 9/10 vs 3/10
    -> [0.1705, 0.8090]."""
    assert difference(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=5e-4)
    assert difference(9, 10, 3, 10) == pytest.approx((0.1705, 0.8090), abs=5e-4)


@pytest.mark.parametrize(("rate", "requests", "field"), [
    (-0.1, 20, "max_error_rate"), (1.0, 20, "max_error_rate"), (1.5, 20, "max_error_rate"),
    (math.nan, 20, "max_error_rate"), ("0.05", 20, "max_error_rate"), (True, 20, "max_error_rate"),
    (0.05, 0, "min_requests"), (0.05, -3, "min_requests"), (0.05, 2.5, "min_requests"), (0.05, None, "min_requests"),
])
def test_bad_thresholds_are_a_value_error_naming_the_field(rate, requests, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        check_thresholds(rate, requests)
    with pytest.raises(ValueError, match=f"^{field}: "):
        verdict(3, 30, rate, requests)


def test_good_thresholds_come_back_typed():
    assert check_thresholds(0, 20.0) == (0.0, 20) and check_thresholds(0.05, 1) == (0.05, 1)


def test_counts_that_cannot_be_are_refused():
    with pytest.raises(ValueError, match="^errors: "):
        verdict(5, 4, 0.05, 1)
    with pytest.raises(ValueError, match="^current_errors: "):
        verdict(1, 40, 0.05, 20, 50, 40)


def test_a_canary_with_bad_thresholds_is_refused_before_anything_changes():
    """rollout.start_canary checks the record's thresholds before it reads or changes anything (no Ray needed:
    the check comes first)."""
    from aigc_ray.serving import rollout

    deployed = rollout.Deployed("aigc", "imperative", {"checkpoints": ["gan=/nowhere"]})
    with pytest.raises(ValueError, match="^max_error_rate: "):
        rollout.start_canary(deployed, "gan", "/nowhere/else", "v2", 10.0, 1.0, 20)
    with pytest.raises(ValueError, match="^min_requests: "):
        rollout.start_canary(deployed, "gan", "/nowhere/else", "v2", 10.0, 0.05, 0)


def test_the_status_shows_the_intervals_and_the_verdict():
    from aigc_ray.serving.canary import Tally, describe

    record = {"version": "v2", "percent": 10.0, "max_error_rate": 0.05, "min_requests": 20, "state": "running"}
    shown = describe(record, Tally(40, 15), Tally(400, 120), "v1")
    assert shown["requests"] == 40 and shown["errors"] == 15 and shown["current_requests"] == 400
    assert shown["verdict"] == "inconclusive" and "not rolled back" in shown["verdict_reason"]
    interval = shown["error_interval"]
    assert interval["method"] == "wilson" and interval["level"] == 0.95
    assert interval["candidate"] == pytest.approx(wilson(15, 40)) and interval["current"] == pytest.approx(wilson(120, 400))
    assert interval["difference"][0] <= 0 <= interval["difference"][1]
    assert describe(record, Tally(), Tally())["error_interval"]["candidate"] is None
    assert describe(record, Tally(5, 0), Tally())["verdict"] == "waiting"
    bad = describe({**record, "min_requests": 0}, Tally(40, 15), Tally())
    assert bad["verdict"] == "unjudged" and "min_requests" in bad["verdict_reason"]
    import json

    json.dumps(shown, allow_nan=False)  # /v1/models serves it as JSON
