"""
Evaluation metrics shared by all five method scripts, in plain numpy, so every script reports the same numbers.

Classification: accuracy, f1_macro, auroc, cohen_kappa, confusion_matrix, per_class_accuracy,
precision_recall_f1 (per-class), and classification_report (report_from_probs: from probabilities) / format_table
which bundle them into the dict + text table the scripts print and save; mean_std / format_mean_std summarise the
reports of several seeds.
Retrieval: precision_at_k (class-block retrieval, as in GLoRIA / ALTA) and recall_at_k (paired image <-> text).
Uncertainty: bootstrap_ci, a percentile bootstrap over rows.

Conventions (the tests check them against scikit-learn to 1e-6):
- Labels are non-negative integer class indices. Inputs can be lists, numpy arrays, or torch tensors that the
  caller converted with .cpu().numpy() (anything np.asarray takes). Bad shapes or labels raise ValueError (these functions are called by code on
  arrays, not on user files, so there is no file to name).
- f1_macro and cohen_kappa follow sklearn's f1_score(average="macro") and cohen_kappa_score exactly, including
  their choice of labels (the classes present in y or pred) and zero-division -> 0, without the warning.
- auroc is the Mann-Whitney U statistic with average ranks for tied scores, which is what sklearn's
  roc_auc_score computes. Where sklearn would raise (a label with only one class present), we return nan for that
  label and leave it out of the macro average.
- Return types: auroc(...) is a float (binary AUC, or the macro average over classes or labels);
  auroc(..., average=None) is a (C,) float array with one AUC per class or label (nan if undefined).
"""

import warnings

import numpy as np

# -----------------------------------------------------------------------------
# input checking


def _labels(x, name):
    """Return x as a 1-D int64 array of class indices, or raise ValueError saying what is wrong."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if a.dtype == bool:
        a = a.astype(np.int64)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        # a float tensor of labels (e.g. from a torch float target) is fine as long as it holds whole numbers
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{name} must hold integer class indices, got non-integer floats")
    a = a.astype(np.int64)
    if a.min() < 0:
        raise ValueError(f"{name} must hold class indices >= 0, got {a.min()}")
    return a


def _pair(y, pred):
    """Check y and pred are same-length label vectors; return them as int64 arrays."""
    y, pred = _labels(y, "y"), _labels(pred, "pred")
    if len(y) != len(pred):
        raise ValueError(f"y and pred must have the same length, got {len(y)} and {len(pred)}")
    return y, pred


def _label_list(labels, y, pred):
    """The classes a metric is computed over: the given list, or (like sklearn) the sorted union of y and pred."""
    if labels is None:
        return np.union1d(y, pred)
    labels = _labels(labels, "labels")
    if len(np.unique(labels)) != len(labels):
        raise ValueError(f"labels must not repeat, got {labels.tolist()}")
    return labels


def _counts(y, pred, labels):
    """Per-class true positives, false positives and false negatives for each class in labels, as (L,) arrays."""
    tp = np.array([np.sum((y == c) & (pred == c)) for c in labels], dtype=np.int64)
    fp = np.array([np.sum((y != c) & (pred == c)) for c in labels], dtype=np.int64)
    fn = np.array([np.sum((y == c) & (pred != c)) for c in labels], dtype=np.int64)
    return tp, fp, fn


def _positions(x, labels):
    """Position of each value of x in labels (any order), or -1 where it is not in labels."""
    order = np.argsort(labels)
    i = np.clip(np.searchsorted(labels[order], x), 0, len(labels) - 1)
    return np.where(labels[order][i] == x, order[i], -1)


def _safe_div(num, den):
    """num / den elementwise, with 0 where den == 0 (sklearn's zero_division default, minus the warning)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)

# -----------------------------------------------------------------------------
# classification metrics


def accuracy(y, pred):
    """Fraction of samples with pred == y."""
    y, pred = _pair(y, pred)
    return float(np.mean(y == pred))


def confusion_matrix(y, pred, num_classes=None):
    """(C, C) int64 counts, rows = true class, cols = predicted class. C defaults to max label + 1."""
    y, pred = _pair(y, pred)
    top = int(max(y.max(), pred.max()))
    if num_classes is None:
        num_classes = top + 1
    if top >= num_classes:
        raise ValueError(f"label {top} is out of range for num_classes={num_classes}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)  # add.at, not cm[y, pred] += 1, which would count repeated pairs only once
    return cm


def per_class_accuracy(y, pred, num_classes):
    """(C,) fraction of each true class predicted correctly (= per-class recall); nan for a class absent from y."""
    cm = confusion_matrix(y, pred, num_classes)
    n = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.diag(cm) / n, np.nan)


def precision_recall_f1(y, pred, labels=None):
    """Per-class (precision, recall, f1, support), each a (L,) array over labels (default: classes in y or pred).
    Same as sklearn's precision_recall_fscore_support(average=None, zero_division=0)."""
    y, pred = _pair(y, pred)
    labels = _label_list(labels, y, pred)
    tp, fp, fn = _counts(y, pred, labels)
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)  # = 2PR / (P + R), written so 0/0 cannot happen in between
    return precision, recall, f1, tp + fn


def f1_macro(y, pred, labels=None):
    """Unweighted mean of per-class F1 over labels, as sklearn f1_score(average="macro").

    labels=None uses the classes present in y or pred (sklearn's default). The CILMP evaluator passes
    labels=np.unique(y), which drops classes that are only ever predicted: a different, usually higher number,
    so say which one you report. A class with no true and no predicted samples scores 0.
    """
    return float(np.mean(precision_recall_f1(y, pred, labels)[2]))


def cohen_kappa(y, pred, weights=None, labels=None):
    """Cohen's kappa, as sklearn cohen_kappa_score: 1 - sum(W * O) / sum(W * E), O the observed confusion matrix,
    E the one expected by chance (outer product of the marginals), W the disagreement weights.

    weights: None (W = 1 off the diagonal), "linear" (|i - j|) or "quadratic" ((i - j)^2).
    NOTE a footgun inherited from sklearn: i, j are positions in `labels`, not label values. With labels=None
    only classes present in y or pred are kept, so if grade 2 of 0..4 never occurs, grades 1 and 3 count as
    neighbours. Pass labels=range(num_classes) for weighted kappa on ordinal grades (classification_report does).
    Samples whose y or pred is not in labels are left out. Returns nan when undefined (e.g. only one class).
    """
    y, pred = _pair(y, pred)
    labels = _label_list(labels, y, pred)
    if weights not in (None, "linear", "quadratic"):
        raise ValueError(f'weights must be None, "linear" or "quadratic", got {weights!r}')
    yi, pi = _positions(y, labels), _positions(pred, labels)
    keep = (yi >= 0) & (pi >= 0)  # drop samples outside labels
    yi, pi = yi[keep], pi[keep]
    L = len(labels)
    observed = np.zeros((L, L), dtype=np.float64)
    np.add.at(observed, (yi, pi), 1.0)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / max(observed.sum(), 1.0)
    i, j = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    if weights is None:
        w = (i != j).astype(np.float64)
    elif weights == "linear":
        w = np.abs(i - j).astype(np.float64)
    else:
        w = ((i - j) ** 2).astype(np.float64)
    den = np.sum(w * expected)
    if den == 0:
        return float("nan")  # chance disagreement is zero: kappa is 0/0
    return float(1.0 - np.sum(w * observed) / den)

# -----------------------------------------------------------------------------
# AUROC


def _average_ranks(s):
    """1-based ranks of s, with tied values all given the mean of the ranks they span."""
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    first = np.concatenate([[True], s_sorted[1:] != s_sorted[:-1]])  # (N,) True at the start of each tie group
    starts = np.flatnonzero(first)
    ends = np.concatenate([starts[1:], [len(s)]])
    mean_rank = (starts + 1 + ends) / 2.0  # a group covers ranks starts+1 .. ends
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = mean_rank[np.cumsum(first) - 1]
    return ranks


def _binary_auroc(y, s):
    """AUC for 0/1 targets y and scores s (1-D, same length); nan if y has only one class.

    Mann-Whitney: AUC = P(score of a random positive > score of a random negative) + 0.5 P(tie)
                      = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)
    """
    n_pos = int(np.sum(y == 1))
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _scores(x, name="scores"):
    """Return scores as a float64 array, refusing NaN (it has no rank)."""
    s = np.asarray(x, dtype=np.float64)
    if np.any(np.isnan(s)):
        raise ValueError(f"{name} contain NaN")
    return s


def auroc(y, scores, average="macro", mask=None):
    """Area under the ROC curve. Three cases, chosen by the shapes:

    binary       y (N,) in {0, 1},        scores (N,)    score of the positive class
    multiclass   y (N,) in 0..C-1,        scores (N, C)  one-vs-rest: class c vs the rest, ranked by scores[:, c]
    multi-label  y (N, C) in {0, 1},      scores (N, C)  each column is its own binary problem

    Returns a float: the binary AUC, or the macro mean over classes / labels. average=None returns the (C,) array
    of per-class (or per-label) AUCs instead; a 1-D binary input always returns a float.
    A class or label whose targets are all 0 or all 1 has no AUC: it is nan in the per-class array and left out
    of the macro mean (sklearn raises here instead). If none is defined, the result is nan.
    For multiclass pass softmax probabilities, not logits: OvR ranks each column across samples, and softmax
    is not monotone per column, so the two give different numbers (papers and sklearn use probabilities).
    mask (N, C) of 0/1, multi-label only: entries with mask 0 (e.g. CheXpert blanks or "uncertain" labels you
    chose to ignore) are left out of that label's AUC.
    """
    if average not in ("macro", None):
        raise ValueError(f'average must be "macro" or None, got {average!r}')
    y, s = np.asarray(y), _scores(scores)
    if len(y) != len(s):
        raise ValueError(f"y and scores must have the same length, got {len(y)} and {len(s)}")
    if len(y) == 0:
        raise ValueError("y is empty")
    if mask is not None and y.ndim != 2:
        raise ValueError("mask is only for multi-label y of shape (N, C)")

    if y.ndim == 1 and s.ndim == 1:  # binary
        y = _labels(y, "y")
        if y.max() > 1:
            raise ValueError(f"binary auroc needs y in {{0, 1}}, got label {y.max()}; "
                             "for multiclass pass scores of shape (N, C)")
        return _binary_auroc(y, s)

    if s.ndim != 2:
        raise ValueError(f"scores must be (N,) or (N, C), got shape {s.shape}")
    N, C = s.shape
    if y.ndim == 1:  # multiclass one-vs-rest
        y = _labels(y, "y")
        if y.max() >= C:
            raise ValueError(f"label {y.max()} is out of range for scores with {C} columns")
        per_class = np.array([_binary_auroc((y == c).astype(np.int64), s[:, c]) for c in range(C)])
    elif y.ndim == 2:  # multi-label
        if y.shape != s.shape:
            raise ValueError(f"multi-label y and scores must have the same shape, got {y.shape} and {s.shape}")
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("multi-label y must hold only 0 and 1")
        y = y.astype(np.int64)
        keep = np.ones_like(y, dtype=bool)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != y.shape:
                raise ValueError(f"mask must have the shape of y {y.shape}, got {mask.shape}")
            keep = mask != 0
        per_class = np.array([_binary_auroc(y[keep[:, c], c], s[keep[:, c], c]) for c in range(C)])
    else:
        raise ValueError(f"y must be (N,) or (N, C), got shape {y.shape}")

    if average is None:
        return per_class
    defined = per_class[~np.isnan(per_class)]
    return float(defined.mean()) if len(defined) else float("nan")

# -----------------------------------------------------------------------------
# retrieval


def _ranking(sim, k):
    """Check sim is (Q, N) and 1 <= k <= N; return the (Q, k) indices of the top-k items of each query.
    Ties go to the lower item index (stable argsort of -sim), so the result does not depend on the platform."""
    sim = _scores(sim, "sim")
    if sim.ndim != 2:
        raise ValueError(f"sim must be (Q, N) = queries x items, got shape {sim.shape}")
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= sim.shape[1]):
        raise ValueError(f"k must be an int in 1..{sim.shape[1]} (the number of items), got {k!r}")
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]  # (Q, k)


def precision_at_k(sim, query_labels, item_labels, k):
    """Class-block retrieval (GLoRIA, ALTA): for each query, the fraction of its top-k items (by sim, a (Q, N)
    query x item similarity matrix) whose label equals the query's label; then the mean over queries."""
    top = _ranking(sim, k)  # (Q, k)
    q, items = _labels(query_labels, "query_labels"), _labels(item_labels, "item_labels")
    Q, N = np.shape(sim)
    if len(q) != Q or len(items) != N:
        raise ValueError(f"sim is {Q} x {N} but got {len(q)} query_labels and {len(items)} item_labels")
    hits = items[top] == q[:, None]  # (Q, k)
    return float(hits.mean())


def recall_at_k(sim, k):
    """Paired retrieval: query i's one correct item is item i (e.g. image i and its own report). Returns the
    fraction of queries whose correct item is in their top-k. sim is (Q, N) with N >= Q."""
    top = _ranking(sim, k)  # (Q, k)
    Q, N = top.shape[0], np.shape(sim)[1]
    if N < Q:
        raise ValueError(f"recall_at_k needs at least as many items as queries, sim is {Q} x {N}")
    hits = np.any(top == np.arange(Q)[:, None], axis=1)  # (Q,)
    return float(hits.mean())

# -----------------------------------------------------------------------------
# bootstrap


def bootstrap_ci(metric, *arrays, n=1000, seed=0, alpha=0.05):
    """Percentile bootstrap: returns (point, low, high) for metric(*arrays).

    point is metric on the full data. Each of the n resamples draws N row indices with replacement,
    idx = rng.integers(0, N, N) from np.random.default_rng(seed), and applies the SAME idx to every array
    (rows stay paired: y with pred, y with probs); low / high are the alpha/2 and 1 - alpha/2 quantiles of the
    resampled values. Resamples where the metric is undefined (nan, e.g. AUROC on a resample with no positives)
    are skipped, with a warning saying how many, so the interval then rests on fewer than n values; if all are
    nan, low and high are nan.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample")
    arrays = [np.asarray(a) for a in arrays]
    N = len(arrays[0])
    if N == 0:
        raise ValueError("bootstrap_ci got empty arrays")
    if any(len(a) != N for a in arrays):
        raise ValueError(f"all arrays must have the same number of rows, got {[len(a) for a in arrays]}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")

    def value(*xs):
        v = metric(*xs)
        if np.ndim(v) != 0:
            raise ValueError(f"bootstrap_ci needs a metric that returns a scalar, got shape {np.shape(v)}")
        return float(v)

    point = value(*arrays)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, N, N)  # (N,) rows drawn with replacement
        vals.append(value(*[a[idx] for a in arrays]))
    vals = np.array(vals)
    ok = vals[~np.isnan(vals)]
    if len(ok) < n:
        warnings.warn(f"bootstrap_ci: {n - len(ok)} of {n} resamples gave nan and were skipped", RuntimeWarning)
    if len(ok) == 0:
        return point, float("nan"), float("nan")
    low, high = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
    return point, float(low), float(high)

# -----------------------------------------------------------------------------
# report


SUMMARY_KEYS = ("acc", "f1_macro", "auroc", "kappa", "kappa_quadratic")  # a classification_report's headline


def classification_report(y, pred, probs, classnames):
    """Everything the method scripts report for a C-class problem, as a JSON-friendly dict (plain floats/ints):

    {"acc", "f1_macro", "auroc", "kappa", "kappa_quadratic",
     "per_class": [{"class", "n", "acc", "precision", "recall", "f1"}, ...],   # one entry per class, in order
     "confusion": [[...], ...]}                                                 # rows = true, cols = predicted

    probs (N, C) softmax probabilities (or None: auroc is then nan). f1_macro uses sklearn's default labels
    (classes in y or pred); kappa and kappa_quadratic use labels=range(C) so grade distances are the label
    distances. Per-class precision/recall/f1 are 0 when undefined (sklearn's zero_division), per-class acc is
    nan for a class with n = 0. NaN values go into json.dump as NaN, which Python's json reads back.
    """
    y, pred = _pair(y, pred)
    C = len(classnames)
    if max(y.max(), pred.max()) >= C:
        raise ValueError(f"label {max(y.max(), pred.max())} is out of range for {C} classnames")
    auc = float("nan")
    if probs is not None:
        probs = np.asarray(probs)
        if probs.shape != (len(y), C):
            raise ValueError(f"probs must be (N, C) = ({len(y)}, {C}), got shape {probs.shape}")
        auc = auroc(y, probs)
    precision, recall, f1, n = precision_recall_f1(y, pred, labels=np.arange(C))
    acc_c = per_class_accuracy(y, pred, C)
    per_class = [{"class": classnames[c], "n": int(n[c]), "acc": float(acc_c[c]), "precision": float(precision[c]),
                  "recall": float(recall[c]), "f1": float(f1[c])} for c in range(C)]
    return {
        "acc": accuracy(y, pred),
        "f1_macro": f1_macro(y, pred),
        "auroc": auc,
        "kappa": cohen_kappa(y, pred, labels=np.arange(C)),
        "kappa_quadratic": cohen_kappa(y, pred, weights="quadratic", labels=np.arange(C)),
        "per_class": per_class,
        "confusion": confusion_matrix(y, pred, C).tolist(),
    }


def report_from_probs(y, probs, classnames):
    """classification_report with pred = the argmax of probs (N, C) (softmax probabilities, say): AUROC is then
    one-vs-rest macro over the classes, which with 2 classes equals the binary AUC."""
    probs = np.asarray(probs)
    return classification_report(y, probs.argmax(1), probs, classnames)


def format_table(report):
    """Render a classification_report dict as a plain-text table: one row per class, then the summary line."""
    rows = report["per_class"]
    w = max([len("class")] + [len(str(r["class"])) for r in rows])
    cols = ["n", "acc", "precision", "recall", "f1"]
    lines = [f"{'class':<{w}}  " + "  ".join(f"{c:>9}" for c in cols)]
    lines.append("-" * len(lines[0]))
    for r in rows:
        cells = [f"{r['n']:>9d}"] + [f"{r[c]:>9.4f}" for c in cols[1:]]  # nan prints as "nan", that's fine
        lines.append(f"{str(r['class']):<{w}}  " + "  ".join(cells))
    lines.append("-" * len(lines[0]))
    lines.append(f"{'total':<{w}}  {sum(r['n'] for r in rows):>9d}")
    lines.append("  ".join(f"{k} {report[k]:.4f}" for k in SUMMARY_KEYS))
    return "\n".join(lines)


def mean_std(reports, keys=SUMMARY_KEYS):
    """Runs over several seeds, reported as the papers do: {key: {"mean", "std"}} with the population std
    (numpy's default, ddof 0) of each headline figure of the classification_report dicts."""
    return {k: {"mean": float(np.mean([r[k] for r in reports])), "std": float(np.std([r[k] for r in reports]))}
            for k in keys}


def format_mean_std(summary, scale=100.0):
    """One line, in percent: "acc 61.20 +- 1.05  f1_macro ..."."""
    return "  ".join(f"{k} {scale * v['mean']:.2f} +- {scale * v['std']:.2f}" for k, v in summary.items())
