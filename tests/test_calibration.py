"""Tests of padim_ooc.calibration against direct computations (sorting and counting), sklearn's
curves, and the coverage the conformal method promises (binomial bounds over many seeds)."""
import dataclasses
import hashlib
import json
import math
from datetime import datetime

import numpy as np
import pytest
from scipy.stats import binom
from sklearn.metrics import f1_score, precision_recall_curve, recall_score, roc_curve

from padim_ooc.calibration import (Calibration, calibrate_labelled, calibrate_normal,
                                   conformal_threshold, holdout_selected, p_values)
from padim_ooc.errors import PadimError

# a seeded test that fails with probability below this under the claimed bound is a real failure
TAIL = 1e-4


def reference_threshold(scores, alpha):
    """The k-th smallest score (1-based), k = ceil((n + 1)(1 - alpha)), by sorting."""
    k = math.ceil(round((len(scores) + 1) * (1 - alpha), 9))
    return float(np.sort(scores)[k - 1])


def reference_p_values(calibration, scores):
    """(1 + number of calibration scores >= s) / (n + 1), counted one by one."""
    n = len(calibration)
    return np.array([(1 + sum(1 for c in calibration if c >= s)) / (n + 1) for s in scores])


def one_line_error(call, *words):
    """Run ``call``, expect a PadimError of one line that contains every word; return it."""
    with pytest.raises(PadimError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    for word in words:
        assert word in message, message
    return message


# ---------------------------------------------------------------- conformal threshold, p-values

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.2, 0.3, 0.5])
@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_conformal_threshold_is_the_rank_from_sorting(seed, alpha, ties):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(math.ceil(1 / alpha) - 1, 300))
    scores = rng.integers(0, 8, n).astype(float) if ties else rng.gamma(2.0, size=n)
    assert conformal_threshold(scores, alpha) == reference_threshold(scores, alpha)


def test_conformal_threshold_exact_ranks():
    # (n + 1)(1 - alpha) is an integer here: floating point must not round it up a rank
    scores = np.arange(1.0, 101.0)[::-1]
    assert conformal_threshold(scores[:19], 0.05) == 100.0  # k = ceil(20 * 0.95) = 19 of 19
    assert conformal_threshold(np.arange(1.0, 30.0), 0.1) == 27.0  # k = ceil(30 * 0.9) = 27
    assert conformal_threshold(np.arange(1.0, 10.0), 0.3) == 7.0   # k = ceil(10 * 0.7) = 7
    assert conformal_threshold(np.arange(1.0, 100.0), 0.05) == 95.0


@pytest.mark.parametrize("n, alpha", [(0, 0.5), (18, 0.05), (50, 0.01), (8, 0.1), (1, 0.4)])
def test_too_few_images_names_the_smallest_alpha_and_the_count_needed(n, alpha):
    scores = np.linspace(0, 1, n)
    if n == 0:
        one_line_error(lambda: conformal_threshold(scores, alpha), "no calibration scores")
        return
    needed = math.ceil(round(1 / alpha, 9)) - 1
    one_line_error(lambda: conformal_threshold(scores, alpha),
                   f"at least {needed} calibration images", f"{1 / (n + 1):.4g}", "1/(n+1)")
    conformal_threshold(np.linspace(0, 1, needed), alpha)  # that many are enough


@pytest.mark.parametrize("alpha", [0, 1, 0.0, 1.0, -0.1, 1.5, float("nan"), float("inf"),
                                   "text", "0.05", True, False, None, [0.05]])
def test_bad_alpha_is_a_one_line_error(alpha):
    one_line_error(lambda: conformal_threshold(np.arange(100.0), alpha), "alpha")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_calibration_scores_are_counted(bad):
    scores = np.arange(50.0)
    scores[[3, 7]] = bad
    one_line_error(lambda: conformal_threshold(scores, 0.1), "2 of the 50")
    one_line_error(lambda: p_values(scores, [1.0]), "2 of the 50")


def test_calibration_scores_must_be_one_per_image():
    one_line_error(lambda: conformal_threshold(np.zeros((10, 10)), 0.1), "1-D", "(10, 10)")


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_p_values_count_like_the_definition(seed, ties):
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(1, 200)), int(rng.integers(1, 200))
    if ties:
        calibration, scores = rng.integers(0, 10, n).astype(float), rng.integers(-1, 12, m) * 1.0
    else:
        calibration, scores = rng.normal(size=n), rng.normal(size=m)
        scores[: m // 4] = calibration[rng.integers(0, n, m // 4)]  # exact ties, too
    got = p_values(calibration, scores)
    assert got.shape == (m,) and got.dtype == np.float64
    np.testing.assert_array_equal(got, reference_p_values(calibration, scores))


def test_p_values_ends_and_bad_scores():
    calibration = np.arange(9.0)
    np.testing.assert_array_equal(p_values(calibration, [np.inf, 100, 8, -np.inf]),
                                  [0.1, 0.1, 0.2, 1.0])
    one_line_error(lambda: p_values(calibration, [1.0, np.nan]), "1 of the 2", "NaN")


# ---------------------------------------------------------------- coverage over many seeds

TRIALS, N_CAL = 2000, 99


@pytest.fixture(scope="module")
def normal_trials():
    """TRIALS calibration sets of N_CAL normal scores and one fresh normal score per trial
    (one per trial, so the alarm count is binomial), all from the same distribution."""
    rng = np.random.default_rng(20240611)
    return rng.lognormal(size=(TRIALS, N_CAL)), rng.lognormal(size=TRIALS)


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_false_alarm_rate_on_fresh_normals_is_at_most_alpha(normal_trials, alpha):
    calibration, fresh = normal_trials
    alarms = sum(fresh[t] > conformal_threshold(calibration[t], alpha) for t in range(TRIALS))
    assert alarms <= binom.isf(TAIL, TRIALS, alpha)
    # and not trivially conservative: the exact rate is at least alpha - 1/(n + 1)
    assert alarms >= binom.ppf(TAIL, TRIALS, alpha - 1 / (N_CAL + 1))


def test_p_values_of_fresh_normals_are_super_uniform(normal_trials):
    calibration, fresh = normal_trials
    p = np.array([p_values(calibration[t], fresh[t:t + 1])[0] for t in range(TRIALS)])
    for a in (0.01, 0.05, 0.1):
        assert np.count_nonzero(p <= a) <= binom.isf(TAIL, TRIALS, a), a


# ---------------------------------------------------------------- the Calibration record

def test_calibrate_normal_decides_with_strict_greater():
    scores = np.random.default_rng(3).integers(0, 20, 199).astype(float)
    cal = calibrate_normal(scores, 0.1)
    assert (cal.rule, cal.alpha, cal.n, cal.pixel_threshold, cal.stale) == \
        ("conformal", 0.1, 199, None, False)
    assert cal.threshold == reference_threshold(scores, 0.1)
    assert list(cal.scores) == sorted(scores)
    new = np.array([cal.threshold - 1, cal.threshold, cal.threshold + 0.5, np.inf])
    assert cal.labels(new).tolist() == ["normal", "normal", "anomalous", "anomalous"]
    np.testing.assert_array_equal(cal.p_values(new), reference_p_values(scores, new))
    assert cal.labels(new.reshape(2, 2)).shape == (2, 2)
    maps = np.array([[cal.threshold, cal.threshold + 1]])
    assert cal.masks(maps).tolist() == [[False, True]]
    one_line_error(lambda: cal.labels([np.nan]), "NaN")
    datetime.fromisoformat(cal.created)


def test_attrs_round_trip_through_json():
    cal = calibrate_normal(np.random.default_rng(4).normal(size=57), 0.05)
    attrs = json.loads(json.dumps(cal.to_attrs()))
    assert Calibration.from_attrs(attrs) == cal
    stale = dataclasses.replace(cal, stale=True, pixel_threshold=2.5)
    assert Calibration.from_attrs(json.loads(json.dumps(stale.to_attrs()))) == stale
    del attrs["stale"]  # optional, False
    assert Calibration.from_attrs(attrs) == cal


@pytest.mark.parametrize("key, value", [
    ("n", "57"), ("n", 57.0), ("n", True), ("n", 0), ("n", 56),
    ("threshold", "1.5"), ("threshold", None), ("threshold", False),
    ("pixel_threshold", "1.5"), ("alpha", "0.05"), ("alpha", None), ("alpha", 1.5),
    ("alpha", True), ("rule", 3), ("rule", "conformal-ish"), ("rule", "recall:2"),
    ("scores", "1,2,3"), ("scores", {"a": 1}), ("scores", [1, "2"]), ("scores", [3.0, 1.0]),
    ("scores", [True] * 57), ("created", 20240611), ("created", "yesterday"),
    ("stale", "false"), ("stale", 0),
])
def test_from_attrs_rejects_retyped_fields(key, value):
    cal = calibrate_normal(np.random.default_rng(4).normal(size=57), 0.05)
    attrs = json.loads(json.dumps(cal.to_attrs()))
    attrs[key] = value
    one_line_error(lambda: Calibration.from_attrs(attrs), "bad calibration", key)


def test_from_attrs_rejects_missing_and_unknown_keys():
    attrs = calibrate_normal(np.arange(30.0), 0.1).to_attrs()
    one_line_error(lambda: Calibration.from_attrs({**attrs, "extra": 1}), "unknown extra")
    del attrs["threshold"]
    one_line_error(lambda: Calibration.from_attrs(attrs), "missing threshold")
    one_line_error(lambda: Calibration.from_attrs([1, 2]), "bad calibration")


# ---------------------------------------------------------------- labelled rules

def labelled_case(seed, n=120, ties=True):
    """Normal and defective scores that overlap; integer-valued (many ties) when ``ties``."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    labels[:2] = [False, True]
    scores = rng.normal(size=n) * 3 + 4 * labels
    return labels, (np.round(scores) if ties else scores)


def candidates(scores):
    """Every threshold that makes a different decision under '>': each distinct score, and one
    below them all."""
    return [np.nextafter(scores.min(), -np.inf), *np.unique(scores)]


def f1_of(labels, flagged):
    tp = np.sum(flagged & labels)
    return 0.0 if tp == 0 else 2 * tp / (np.sum(flagged) + np.sum(labels))


def youden_of(labels, flagged):
    return np.mean(flagged[labels]) - np.mean(flagged[~labels])


def flagged_by(cal, scores):
    return cal.labels(scores) == "anomalous"


CASES = [(seed, ties) for seed in range(6) for ties in (True, False)]


@pytest.mark.parametrize("seed, ties", CASES)
def test_f1_rule_reaches_the_best_f1_of_sklearns_curve(seed, ties):
    labels, scores = labelled_case(seed, ties=ties)
    cal = calibrate_labelled(labels, scores, "f1")
    precision, recall, cuts = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        curve = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    flagged = flagged_by(cal, scores)
    assert f1_score(labels, flagged) == pytest.approx(curve.max(), abs=1e-12)
    assert f1_score(labels, flagged) == pytest.approx(
        max(f1_of(labels, scores > t) for t in candidates(scores)), abs=1e-12)
    best = cuts[np.flatnonzero(curve == curve.max()).max()]  # ties: the highest cut
    np.testing.assert_array_equal(flagged, scores >= best)
    assert cal.threshold in scores or cal.threshold < scores.min()


@pytest.mark.parametrize("seed, ties", CASES)
def test_youden_rule_reaches_the_best_j_of_sklearns_roc(seed, ties):
    labels, scores = labelled_case(seed, ties=ties)
    cal = calibrate_labelled(labels, scores, "youden")
    fpr, tpr, cuts = roc_curve(labels, scores)
    best_j = np.max((tpr - fpr)[np.isfinite(cuts)])
    flagged = flagged_by(cal, scores)
    j = recall_score(labels, flagged) - np.mean(flagged[~labels])
    assert j == pytest.approx(best_j, abs=1e-12)
    assert j == pytest.approx(max(youden_of(labels, scores > t) for t in candidates(scores)),
                              abs=1e-12)
    assert np.isfinite(cal.threshold)


@pytest.mark.parametrize("floor", [1.0, 0.95, 0.9, 0.5, 0.1])
@pytest.mark.parametrize("seed, ties", CASES[:6])
def test_recall_rule_is_the_largest_threshold_that_keeps_the_recall(seed, ties, floor):
    labels, scores = labelled_case(seed, ties=ties)
    cal = calibrate_labelled(labels, scores, f"recall:{floor}")
    assert cal.rule == f"recall:{floor!r}"
    assert recall_score(labels, flagged_by(cal, scores)) >= floor
    keeping = [t for t in candidates(scores) if np.mean(scores[labels] > t) >= floor]
    assert cal.threshold == max(keeping)


@pytest.mark.parametrize("seed", range(10))
def test_recall_one_flags_every_defect(seed):
    labels, scores = labelled_case(seed, n=int(np.random.default_rng(seed).integers(5, 200)))
    cal = calibrate_labelled(labels, scores, "recall:1")
    assert flagged_by(cal, scores)[labels].all()
    assert cal.threshold == max(s for s in candidates(scores) if (scores[labels] > s).all())


def test_recall_one_when_the_lowest_score_is_a_defect():
    labels, scores = np.array([1, 0, 0, 1]), np.array([1.0, 2.0, 3.0, 4.0])
    cal = calibrate_labelled(labels, scores, "recall:1.0")
    assert cal.labels(scores).tolist() == ["anomalous"] * 4 and cal.threshold < 1.0


def test_labelled_record_keeps_the_normal_scores_for_p_values():
    labels, scores = labelled_case(7)
    cal = calibrate_labelled(labels, scores, "youden")
    assert (cal.rule, cal.alpha, cal.n) == ("youden", None, labels.size)
    assert list(cal.scores) == sorted(scores[~labels])
    new = np.linspace(-5, 10, 31)
    np.testing.assert_array_equal(cal.p_values(new), reference_p_values(scores[~labels], new))
    assert Calibration.from_attrs(json.loads(json.dumps(cal.to_attrs()))) == cal


def test_pixel_threshold_reaches_the_best_pixel_f1():
    rng = np.random.default_rng(11)
    masks = np.zeros((6, 16, 16), dtype=bool)
    masks[:3, 4:9, 5:12] = True
    maps = np.round(rng.normal(size=masks.shape) + 2.5 * masks, 1)
    labels, scores = masks.any(axis=(1, 2)), maps.max(axis=(1, 2))
    cal = calibrate_labelled(labels, scores, "f1", pixel=(masks.ravel(), maps.ravel()))
    precision, recall, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    with np.errstate(invalid="ignore"):
        best = np.nanmax(2 * precision * recall / (precision + recall))
    assert f1_score(masks.ravel(), cal.masks(maps).ravel()) == pytest.approx(best, abs=1e-12)
    assert Calibration.from_attrs(json.loads(json.dumps(cal.to_attrs()))) == cal


@pytest.mark.parametrize("rule", ["F2", "", "recall", "recall:", "recall:0", "recall:1.5",
                                  "recall:nan", "recall:-1", "recall:abc", 5, None])
def test_bad_rule_is_a_one_line_error(rule):
    labels, scores = labelled_case(0)
    one_line_error(lambda: calibrate_labelled(labels, scores, rule), repr(rule))


@pytest.mark.parametrize("labels, scores, words", [
    ([0, 0, 0], [1.0, 2.0, 3.0], ("normal and defective", "all 3 are normal")),
    ([1, 1], [1.0, 2.0], ("all 2 are defective",)),
    ([0, 2, 1], [1.0, 2.0, 3.0], ("0 (normal) or 1",)),
    ([0, 1], [1.0, 2.0, 3.0], ("2 labels and 3 scores",)),
    ([0, 1, 1], [1.0, np.nan, np.inf], ("2 of the 3",)),
])
def test_bad_labelled_input_is_a_one_line_error(labels, scores, words):
    one_line_error(lambda: calibrate_labelled(labels, scores, "f1"), *words)


def test_bad_pixel_input_is_a_one_line_error():
    labels, scores = labelled_case(0)
    one_line_error(lambda: calibrate_labelled(labels, scores, "f1", pixel=np.zeros(4)), "pair")
    one_line_error(lambda: calibrate_labelled(labels, scores, "f1",
                                              pixel=(np.zeros(4, bool), np.zeros(4))), "pixel")


# ---------------------------------------------------------------- hold-out by content hash

def test_holdout_is_deterministic_and_reads_the_first_eight_bytes():
    digest = hashlib.blake2b(b"image bytes", digest_size=16).digest()
    assert holdout_selected(digest, 0.3) == holdout_selected(bytes(digest), 0.3)
    assert holdout_selected(bytearray(digest), 0.3) == holdout_selected(digest, 0.3)
    assert holdout_selected(b"\x00" * 16, 1e-12) and not holdout_selected(b"\x00" * 16, 0.0)
    assert not holdout_selected(b"\xff" * 16, 0.999999)
    half = (2**63).to_bytes(8, "big")
    assert not holdout_selected(half + b"\x00" * 8, 0.5)
    assert holdout_selected((2**63 - 1).to_bytes(8, "big") + b"\xff" * 8, 0.5)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5])
def test_holdout_share_is_the_fraction(fraction):
    rng = np.random.default_rng(int(fraction * 1000))
    digests = [hashlib.blake2b(rng.bytes(32), digest_size=16).digest() for _ in range(20000)]
    chosen = np.array([holdout_selected(d, fraction) for d in digests])
    count = int(chosen.sum())
    assert binom.ppf(TAIL, 20000, fraction) <= count <= binom.isf(TAIL, 20000, fraction)
    # nested: raising the fraction keeps the images a smaller one held out
    assert all(holdout_selected(d, fraction + 0.05) for d in np.array(digests)[chosen])


@pytest.mark.parametrize("fraction", [1, 1.0, -0.1, float("nan"), "0.1", True, None])
def test_bad_holdout_fraction_is_a_one_line_error(fraction):
    one_line_error(lambda: holdout_selected(b"\x00" * 16, fraction), "fraction")


@pytest.mark.parametrize("digest", [b"short", "0" * 32, 12345, None])
def test_bad_digest_is_a_one_line_error(digest):
    one_line_error(lambda: holdout_selected(digest, 0.1), "digest")
