"""
Tests for common/metrics.py.

Expected numbers come from two places:
- tests/goldens/metrics/metrics_goldens.json: scikit-learn's answers on stored inputs, written by
  tests/goldens/metrics/make_metrics_goldens.py (run in the gold venv; sklearn is not a test dependency);
- small cases below, computed by hand with the arithmetic in the comments.
"""

import json
import math
import os
import warnings

import numpy as np
import pytest

from common import metrics
from common.metrics import (accuracy, auroc, bootstrap_ci, classification_report, cohen_kappa, confusion_matrix,
                            f1_macro, format_table, per_class_accuracy, precision_at_k, recall_at_k)

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens", "metrics", "metrics_goldens.json")
with open(GOLDENS) as f:
    _GOLD = json.load(f)


def _resolve(x):
    """Golden inputs refer to shared arrays as "@name"."""
    if isinstance(x, str) and x.startswith("@"):
        return np.array(_GOLD["arrays"][x[1:]])
    return np.array(x) if isinstance(x, list) and x and not isinstance(x[0], str) else x


def _close(got, expected, what):
    """assert_allclose to 1e-6 with NaN == NaN, with a message naming the case."""
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=0, atol=1e-6, equal_nan=True, err_msg=what)


# -----------------------------------------------------------------------------
# agreement with scikit-learn


@pytest.mark.parametrize("case", _GOLD["cases"], ids=[c["name"] for c in _GOLD["cases"]])
def test_matches_sklearn(case):
    fn = getattr(metrics, case["fn"])
    args = [_resolve(a) for a in case["args"]]
    kwargs = {k: _resolve(v) for k, v in case["kwargs"].items()}
    got, exp = fn(*args, **kwargs), case["expected"]
    if case["fn"] == "classification_report":
        for key in ["acc", "f1_macro", "auroc", "kappa", "kappa_quadratic"]:
            _close(got[key], exp[key], f"{case['name']}: {key}")
        assert got["confusion"] == exp["confusion"]
        assert [r["class"] for r in got["per_class"]] == [r["class"] for r in exp["per_class"]]
        assert [r["n"] for r in got["per_class"]] == [r["n"] for r in exp["per_class"]]
        for key in ["acc", "precision", "recall", "f1"]:
            _close([r[key] for r in got["per_class"]], [r[key] for r in exp["per_class"]], f"{case['name']}: {key}")
    elif case["fn"] == "confusion_matrix":
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, exp)
    else:
        _close(got, exp, case["name"])


def test_goldens_cover_the_spec():
    """The golden file must keep covering what the spec asks for (guards against a regenerated, thinner file)."""
    names = {c["name"] for c in _GOLD["cases"]}
    for must in ["f1_macro_absent_from_y", "f1_macro_absent_from_y_labels_unique_y", "f1_macro_absent_from_pred",
                 "kappa_mc_None", "kappa_mc_linear", "kappa_mc_quadratic", "kappa_gap_linear_labels_range",
                 "auroc_binary", "auroc_binary_ties", "auroc_multiclass_ovr", "auroc_multiclass_ties",
                 "auroc_multiclass_absent_class_per_class", "auroc_multilabel_per_label",
                 "auroc_multilabel_undefined_macro", "auroc_multilabel_mask_per_label", "recall_at_5",
                 "report_absent_class"]:
        assert must in names
    # and the f1 with labels=unique(y) really differs from the default when a class is only predicted
    exp = {c["name"]: c["expected"] for c in _GOLD["cases"]}
    assert exp["f1_macro_absent_from_y_labels_unique_y"] > exp["f1_macro_absent_from_y"] + 0.05

# -----------------------------------------------------------------------------
# small hand-computed cases


def test_accuracy_and_confusion_by_hand():
    y, pred = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    assert accuracy(y, pred) == pytest.approx(4 / 6)
    # repeated (true, pred) pairs must all count: (2, 2) occurs twice
    np.testing.assert_array_equal(confusion_matrix(y, pred), [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    np.testing.assert_array_equal(confusion_matrix(y, pred, num_classes=4)[3], [0, 0, 0, 0])
    # per-class accuracy = diagonal / row sums = 1/2, 1/1, 2/3; class 3 has no samples -> nan
    _close(per_class_accuracy(y, pred, 4), [0.5, 1.0, 2 / 3, np.nan], "per_class_accuracy")


def test_f1_macro_by_hand():
    y, pred = [0, 0, 1, 1], [0, 1, 1, 2]
    # F1 = 2TP / (2TP + FP + FN): class 0: 2/(2+0+1) = 2/3; class 1: 2/(2+1+1) = 1/2; class 2 (only predicted): 0/1 = 0
    assert f1_macro(y, pred) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # labels=unique(y) (the CILMP evaluator) drops class 2 from the mean
    assert f1_macro(y, pred, labels=np.unique(y)) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_cohen_kappa_by_hand():
    y, pred = [0, 0, 1, 1], [0, 1, 1, 1]
    # observed [[1, 1], [0, 2]]: p_o = 3/4; rows (2, 2), cols (1, 3): p_e = (2*1 + 2*3) / 16 = 1/2
    # kappa = (p_o - p_e) / (1 - p_e) = (3/4 - 1/2) / (1/2) = 1/2
    assert cohen_kappa(y, pred) == pytest.approx(0.5)
    # 3 grades, y = [0, 2], pred = [2, 0]: observed [[0,0,1],[0,0,0],[1,0,0]], expected = outer((1,0,1),(1,0,1))/2
    # quadratic W = (i-j)^2: sum W*O = 4 + 4 = 8, sum W*E = (4 + 4) / 2 = 4 -> kappa = 1 - 8/4 = -1
    assert cohen_kappa([0, 2], [2, 0], weights="quadratic", labels=[0, 1, 2]) == pytest.approx(-1.0)
    # labels=None keeps only {0, 2}, so they become neighbours: W = [[0,1],[1,0]] -> sum W*O = 2, sum W*E = 1 -> -1
    assert cohen_kappa([0, 2], [2, 0], weights="quadratic") == pytest.approx(-1.0)
    # y = [0, 0, 3, 3], pred = [0, 1, 3, 3], linear weights: here the absent grade 2 changes the answer.
    # O has (0,0) = 1, (0,1) = 1, (3,3) = 2, so sum W*O = |0-1| * 1 = 1 either way; E = outer(rows, cols) / 4.
    # labels=[0,1,2,3]: rows (2,0,0,2), cols (1,1,0,2): sum W*E = (1*2*1 + 3*2*2 + 3*2*1 + 2*2*1) / 4 = 24/4 = 6
    #   -> kappa = 1 - 1/6 = 5/6
    # labels=None -> [0, 1, 3] at positions 0, 1, 2: rows (2,0,2), cols (1,1,2):
    #   sum W*E = (1*2*1 + 2*2*2 + 2*2*1 + 1*2*1) / 4 = 16/4 = 4 -> kappa = 1 - 1/4 = 3/4
    assert cohen_kappa([0, 0, 3, 3], [0, 1, 3, 3], weights="linear", labels=range(4)) == pytest.approx(5 / 6)
    assert cohen_kappa([0, 0, 3, 3], [0, 1, 3, 3], weights="linear") == pytest.approx(3 / 4)
    assert math.isnan(cohen_kappa([3, 3], [3, 3]))  # one class only: 0/0


def test_auroc_ties_by_hand():
    # pairs (positive, negative): (0.5 vs 0.1) = 1, (0.5 vs 0.5) = 1/2 (tie), (0.9 vs 0.1) = 1, (0.9 vs 0.5) = 1
    # -> AUC = 3.5 / 4. Mann-Whitney: ranks 1, 2.5, 2.5, 4; positives sum 6.5 - 2*3/2 = 3.5, / (2*2)
    assert auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert auroc([0, 1, 0, 1], [3.0, 3.0, 3.0, 3.0]) == pytest.approx(0.5)  # all tied: chance
    np.testing.assert_array_equal(metrics._average_ranks(np.array([5.0, 1.0, 5.0, 2.0, 5.0])), [4, 1, 4, 2, 4])


def test_auroc_return_types_and_undefined():
    y = [0, 1, 2, 1]
    P = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .2, .7], [.3, .4, .3]])
    assert isinstance(auroc(y, P), float) and auroc(y, P) == pytest.approx(1.0)
    per = auroc(y, P, average=None)
    assert isinstance(per, np.ndarray) and per.shape == (3,)
    # binary with only one class present: undefined, not a crash
    assert math.isnan(auroc([1, 1, 1], [0.2, 0.5, 0.9]))
    # multi-label: label 1 all negative, label 2 all positive -> nan; macro averages the one defined label
    Y = np.array([[0, 0, 1], [1, 0, 1], [1, 0, 1]])
    S = np.array([[0.1, 0.3, 0.2], [0.9, 0.1, 0.8], [0.6, 0.2, 0.5]])
    _close(auroc(Y, S, average=None), [1.0, np.nan, np.nan], "multilabel per label")
    assert auroc(Y, S) == pytest.approx(1.0)
    # nothing defined at all -> nan without a numpy "mean of empty slice" warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(auroc(np.ones((3, 2), dtype=int), np.random.rand(3, 2)))


def test_precision_at_k_by_hand():
    item_labels = [0, 0, 1, 1, 2]
    sim = np.array([[0.9, 0.1, 0.8, 0.2, 0.0],    # query label 0: top-2 = items 0 (0), 2 (1) -> 1/2
                    [0.5, 0.5, 0.5, 0.9, 0.1],    # query label 1: top-2 = item 3 (1), then tie 0,1,2 -> item 0 (0) -> 1/2
                    [0.1, 0.2, 0.3, 0.4, 0.5]])   # query label 2: top-2 = items 4 (2), 3 (1) -> 1/2
    assert precision_at_k(sim, [0, 1, 2], item_labels, k=2) == pytest.approx(0.5)
    # k=1: hits 1, 1, 1 -> 1.0 ; k=3: query 0 {0, 2, 3} -> 1/3, query 1 {3, 0, 1} -> 1/3, query 2 {4, 3, 2} -> 1/3
    assert precision_at_k(sim, [0, 1, 2], item_labels, k=1) == pytest.approx(1.0)
    assert precision_at_k(sim, [0, 1, 2], item_labels, k=3) == pytest.approx(1 / 3)
    # the tie-break is the lower item index: for query 1 with k=2 a tie among items 0,1,2 picks item 0 (label 0);
    # relabel item 0 to class 1 and the hit count of query 1 becomes 2/2
    assert precision_at_k(sim, [0, 1, 2], [1, 0, 1, 1, 2], k=2) == pytest.approx((0 / 2 + 2 / 2 + 1 / 2) / 3)
    # long runs of ties (numpy's default quicksort is not stable there): the 50 even items tie at 1.0, and the
    # first 10 of them by index (items 0, 2, ..., 18, all labelled 1) must win
    sim = np.tile([1.0, 0.0], 50)[None]  # (1, 100)
    assert precision_at_k(sim, [1], [1] * 20 + [0] * 80, k=10) == 1.0
    # recall: every query sees the same 50 tied items; only queries 0, 2, ..., 18 find their item in the top 10
    assert recall_at_k(np.repeat(sim, 100, axis=0), 10) == pytest.approx(10 / 100)


def test_recall_at_k_by_hand():
    sim = np.array([[0.9, 0.1, 0.2],    # item 0 ranks 1st
                    [0.3, 0.3, 0.5],    # item 1 ties with item 0 at 0.3 and loses the tie: rank 3
                    [0.7, 0.1, 0.6]])   # item 2 ranks 2nd
    assert recall_at_k(sim, 1) == pytest.approx(1 / 3)
    assert recall_at_k(sim, 2) == pytest.approx(2 / 3)
    assert recall_at_k(sim, 3) == pytest.approx(1.0)
    # more items than queries is fine (extra distractors): query 0 now has a better distractor
    assert recall_at_k(np.c_[sim, [1.0, 0.0, 0.0]], 1) == pytest.approx(0.0)


def test_inputs_lists_arrays_and_float_labels_agree():
    y, pred = [0, 1, 2, 2, 1], [0, 2, 2, 2, 1]
    a = f1_macro(y, pred)
    assert f1_macro(np.array(y), np.array(pred, dtype=np.int32)) == a
    assert f1_macro(np.array(y, dtype=np.float32), pred) == a  # whole-number float labels are accepted
    assert accuracy(np.array([True, False]), [1, 1]) == 0.5


@pytest.mark.parametrize("call, match", [
    (lambda: accuracy([0, 1], [0, 1, 1]), "same length"),
    (lambda: accuracy([], []), "empty"),
    (lambda: accuracy([[0, 1]], [[0, 1]]), "1-D"),
    (lambda: accuracy([0.5, 1], [0, 1]), "integer"),
    (lambda: accuracy([-1, 1], [0, 1]), ">= 0"),
    (lambda: accuracy(["a", "b"], [0, 1]), "dtype"),
    (lambda: confusion_matrix([0, 3], [0, 1], num_classes=3), "out of range"),
    (lambda: cohen_kappa([0, 1], [0, 1], weights="cubic"), "weights"),
    (lambda: f1_macro([0, 1], [0, 1], labels=[0, 0, 1]), "repeat"),
    (lambda: auroc([0, 1, 2], [0.1, 0.2, 0.3]), "binary"),
    (lambda: auroc([0, 1], [0.1, np.nan]), "NaN"),
    (lambda: auroc([0, 3], np.ones((2, 3))), "out of range"),
    (lambda: auroc(np.zeros((2, 3)), np.ones((2, 4))), "same shape"),
    (lambda: auroc(np.full((2, 3), 2), np.ones((2, 3))), "only 0 and 1"),
    (lambda: auroc([0, 1], np.ones((3, 2))), "same length"),
    (lambda: auroc([0, 1], [0.1, 0.2], average="micro"), "average"),
    (lambda: auroc([0, 1], [0.1, 0.2], mask=[1, 1]), "mask"),
    (lambda: precision_at_k(np.ones((2, 3)), [0, 1], [0, 1, 1], k=4), "k must"),
    (lambda: precision_at_k(np.ones((2, 3)), [0, 1], [0, 1], k=1), "item_labels"),
    (lambda: precision_at_k(np.ones(3), [0], [0, 1, 1], k=1), "sim must be"),
    (lambda: recall_at_k(np.ones((3, 2)), 1), "at least as many items"),
    (lambda: bootstrap_ci(accuracy, [0, 1], [0, 1, 1]), "same number of rows"),
    (lambda: bootstrap_ci(lambda y: np.array([1.0, 2.0]), [0, 1], n=2), "scalar"),
    (lambda: classification_report([0, 2], [0, 1], None, ["a", "b"]), "out of range"),
    (lambda: classification_report([0, 1], [0, 1], np.ones((2, 3)), ["a", "b"]), "probs must be"),
])
def test_bad_inputs_raise_clear_valueerror(call, match):
    with pytest.raises(ValueError, match=match):
        call()

# -----------------------------------------------------------------------------
# bootstrap


def test_bootstrap_resamples_rows_jointly_with_the_documented_generator():
    N, n, seed = 50, 20, 7
    a, b = np.arange(N), np.arange(N) * 10
    seen = []

    def metric(x, z):
        seen.append((x.copy(), z.copy()))
        return float(np.mean(x))

    point, low, high = bootstrap_ci(metric, a, b, n=n, seed=seed)
    assert len(seen) == n + 1  # the point estimate, then exactly n resamples
    assert point == pytest.approx(np.mean(a))
    rng = np.random.default_rng(seed)
    for x, z in seen[1:]:
        idx = rng.integers(0, N, N)
        np.testing.assert_array_equal(x, a[idx])  # really a resample, drawn as documented ...
        np.testing.assert_array_equal(z, x * 10)  # ... with the same rows for every array
    assert len({x.tobytes() for x, _ in seen[1:]}) == n  # all resamples differ
    assert np.mean([len(np.unique(x)) for x, _ in seen[1:]]) < 0.75 * N  # with replacement: ~63% unique rows


def test_bootstrap_interval_for_accuracy():
    # N = 2000 predictions, 1400 correct: p = 0.7, binomial sd = sqrt(0.7 * 0.3 / 2000) = 0.01025,
    # so the 95% percentile interval should be about 0.7 +- 1.96 * 0.01025 = [0.680, 0.720]
    y = np.zeros(2000, dtype=int)
    pred = np.r_[np.zeros(1400, dtype=int), np.ones(600, dtype=int)]
    vals = []

    def acc(a, b):
        vals.append(accuracy(a, b))
        return vals[-1]

    point, low, high = bootstrap_ci(acc, y, pred, n=1000, seed=0)
    assert point == 0.7 and low < point < high
    assert (high - low) == pytest.approx(2 * 1.96 * 0.01025, rel=0.15)
    assert low == pytest.approx(0.7 - 1.96 * 0.01025, abs=0.004) and high == pytest.approx(0.7 + 1.96 * 0.01025, abs=0.004)
    assert abs(np.mean(vals[1:]) - point) < 0.002  # the bootstrap mean sits on the point estimate (SE ~ 0.0003)
    # low / high are exactly the 2.5% / 97.5% quantiles of the resampled values
    _close([low, high], np.quantile(vals[1:], [0.025, 0.975]), "percentile interval")
    # seeds: same seed -> same interval, different seed -> a different one
    assert bootstrap_ci(accuracy, y, pred, n=1000, seed=0) == (point, low, high)
    other = bootstrap_ci(accuracy, y, pred, n=1000, seed=1)
    assert other[0] == point and (other[1], other[2]) != (low, high)
    # alpha widens / narrows the interval
    _, low90, high90 = bootstrap_ci(accuracy, y, pred, n=1000, seed=0, alpha=0.10)
    assert low < low90 and high90 < high


def test_bootstrap_skips_undefined_resamples():
    # 1 positive among 8: a resample misses it with probability (7/8)^8 = 0.344, making AUROC nan
    y = np.array([0, 0, 0, 0, 0, 0, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.65])
    rng = np.random.default_rng(3)
    expected_nan = sum(y[rng.integers(0, 8, 8)].sum() in (0, 8) for _ in range(200))
    assert 40 < expected_nan < 100  # ~ 0.344 * 200 = 69
    with pytest.warns(RuntimeWarning, match=f"{expected_nan} of 200 resamples gave nan"):
        point, low, high = bootstrap_ci(auroc, y, s, n=200, seed=3)
    assert point == pytest.approx(6 / 7) and 0 <= low <= high <= 1
    # all resamples undefined -> nan interval, but the point estimate still comes back
    with pytest.warns(RuntimeWarning, match="5 of 5"):
        point, low, high = bootstrap_ci(lambda a: float("nan"), [1, 2, 3], n=5)
    assert math.isnan(point) and math.isnan(low) and math.isnan(high)

# -----------------------------------------------------------------------------
# report


def test_classification_report_and_table():
    y = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    P = np.array([[.7, .2, .1], [.4, .5, .1], [.1, .8, .1], [.2, .7, .1], [.1, .1, .8], [.5, .1, .4]])
    names = ["melanoma", "nevus", "basal cell carcinoma"]
    r = classification_report(y, pred, P, names)
    json.loads(json.dumps(r))  # JSON-friendly: plain python types only
    assert r["acc"] == pytest.approx(4 / 6)
    assert r["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # class 0: TP 1, FP 1 (the last sample), FN 1 -> P = R = F1 = 1/2; class 1: P = 2/3, R = 1, F1 = 4/5
    # class 2: P = 1, R = 1/2, F1 = 2/3
    assert [c["n"] for c in r["per_class"]] == [2, 2, 2]
    _close([c["f1"] for c in r["per_class"]], [0.5, 0.8, 2 / 3], "per-class f1")
    _close([c["precision"] for c in r["per_class"]], [0.5, 2 / 3, 1.0], "per-class precision")
    _close([c["acc"] for c in r["per_class"]], [0.5, 1.0, 0.5], "per-class acc")
    assert r["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # kappa: p_o = 4/6; rows (2, 2, 2), cols (2, 3, 1): p_e = (4 + 6 + 2) / 36 = 1/3 -> (2/3 - 1/3) / (2/3) = 1/2
    assert r["kappa"] == pytest.approx(0.5)
    assert r["auroc"] == pytest.approx(auroc(y, P))
    assert math.isnan(classification_report(y, pred, None, names)["auroc"])

    table = format_table(r)
    lines = table.splitlines()
    print("\n" + table)
    assert lines[0].split() == ["class", "n", "acc", "precision", "recall", "f1"]
    row = lines[2 + 2]  # header, rule, then classes in order
    assert row.startswith("basal cell carcinoma") and row.split()[-5:] == ["2", "0.5000", "1.0000", "0.5000", "0.6667"]
    assert len({len(l) for l in lines[:5]}) == 1  # header, rule and class rows line up
    assert lines[-2].split() == ["total", "6"]
    assert "acc 0.6667" in lines[-1] and "kappa 0.5000" in lines[-1] and "f1_macro 0.6556" in lines[-1]


def test_mean_std_over_seeds_by_hand():
    reports = [dict(acc=0.5, f1_macro=0.4, auroc=0.6, kappa=0.1, kappa_quadratic=0.2),
               dict(acc=0.7, f1_macro=0.6, auroc=0.8, kappa=0.3, kappa_quadratic=0.2)]
    s = metrics.mean_std(reports)
    assert list(s) == ["acc", "f1_macro", "auroc", "kappa", "kappa_quadratic"]
    assert s["acc"]["mean"] == pytest.approx(0.6) and s["acc"]["std"] == pytest.approx(0.1)  # population std
    assert s["kappa_quadratic"] == {"mean": pytest.approx(0.2), "std": 0.0}
    assert metrics.mean_std(reports, keys=["auroc"]) == {"auroc": {"mean": pytest.approx(0.7),
                                                                  "std": pytest.approx(0.1)}}
    line = metrics.format_mean_std(s)
    assert line.startswith("acc 60.00 +- 10.00  f1_macro 50.00 +- 10.00") and line.count("+-") == 5


def test_report_from_probs_predicts_the_argmax():
    y = np.array([0, 1, 1, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    rep = metrics.report_from_probs(y, probs, ["a", "b", "c"])
    assert rep == classification_report(y, np.array([0, 1, 0, 2]), probs, ["a", "b", "c"])
    assert rep["acc"] == pytest.approx(0.75) and rep["confusion"][0] == [1, 0, 0] and rep["confusion"][1] == [1, 1, 0]
