"""
Expected values for tests/test_metrics.py, computed with scikit-learn (which is NOT a project dependency).

Run with the gold venv, from the repo root:
    /work/venv-gold/bin/python tests/goldens/metrics/make_metrics_goldens.py
It writes metrics_goldens.json next to this file: a list of cases {"name", "fn", "args", "kwargs", "expected"},
where fn is the common.metrics function to call on args/kwargs and expected is sklearn's answer (NaN = undefined).
The inputs are stored in the JSON (big ones once, under "arrays", referenced from a case as "@name"), so the test
does not depend on numpy's RNG stream. Continuous inputs are rounded to 6 decimals BEFORE sklearn sees them, to
keep the file small; the values are exact for the stored inputs.
"""

import json
import os
import sys
import warnings

import numpy as np
import sklearn
from sklearn.metrics import (cohen_kappa_score, confusion_matrix, f1_score, precision_recall_fscore_support,
                             roc_auc_score, top_k_accuracy_score, accuracy_score)

warnings.filterwarnings("ignore")  # sklearn's zero-division / undefined warnings: we want its values, not the noise
rng = np.random.default_rng(1234)
cases = []


arrays = {}  # big inputs, stored once: a case refers to one as "@name"
_seen = {}


def ref(a):
    """Store input array a once in the JSON (keyed by its content) and return its "@name" reference."""
    key = (a.dtype.str, a.shape, a.tobytes())
    if key not in _seen:
        _seen[key] = f"a{len(arrays)}"
        arrays[_seen[key]] = a.tolist()
    return "@" + _seen[key]


def normal(size):
    """Gaussian noise rounded to 6 decimals, so the stored inputs are short and exactly what sklearn saw."""
    return np.round(rng.normal(size=size), 6)


def add(name, fn, args, expected, **kwargs):
    """Record one case; numpy values become plain lists / floats."""
    def plain(x):
        if isinstance(x, np.ndarray):
            return x.tolist()
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, np.generic):
            return x.item()
        return x
    def arg(x):
        return ref(x) if isinstance(x, np.ndarray) and x.size > 20 else plain(x)
    cases.append({"name": name, "fn": fn, "args": [arg(a) for a in args],
                  "kwargs": {k: arg(v) for k, v in kwargs.items()}, "expected": plain(expected)})


def noisy_preds(y, C, p_correct):
    """Predictions equal to y with probability p_correct, else a uniform random class."""
    return np.where(rng.random(len(y)) < p_correct, y, rng.integers(0, C, len(y)))


def softmax(z):
    """Row softmax, rounded to 6 decimals (rows still sum to 1 within sklearn's check)."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.round(e / e.sum(axis=1, keepdims=True), 6)


def ovr_per_class(y, P):
    """sklearn binary roc_auc_score per column, NaN where the column's class is absent (sklearn would raise)."""
    out = []
    for c in range(P.shape[1]):
        t = (y == c).astype(int)
        out.append(roc_auc_score(t, P[:, c]) if 0 < t.sum() < len(t) else float("nan"))
    return np.array(out)


# ---- label vectors --------------------------------------------------------------------------------------------
N = 300
y_bin = rng.integers(0, 2, N)
p_bin = noisy_preds(y_bin, 2, 0.7)
y_mc = rng.integers(0, 5, N)
p_mc = noisy_preds(y_mc, 5, 0.6)
y_noy = rng.integers(0, 4, N)                            # class 4 absent from y ...
p_noy = noisy_preds(y_noy, 5, 0.6)                       # ... but predicted
y_nop = rng.integers(0, 5, N)
p_nop = noisy_preds(y_nop, 5, 0.6); p_nop[p_nop == 2] = 3  # class 2 never predicted
y_gap = rng.choice([0, 1, 3, 4], N)                      # ordinal grades, grade 2 absent from y and pred
p_gap = np.clip(y_gap + rng.choice([-1, 0, 0, 0, 1], N), 0, 4); p_gap[p_gap == 2] = 1
labelsets = {"bin": (y_bin, p_bin), "mc": (y_mc, p_mc), "absent_from_y": (y_noy, p_noy),
             "absent_from_pred": (y_nop, p_nop), "gap": (y_gap, p_gap)}

for tag, (y, p) in labelsets.items():
    add(f"accuracy_{tag}", "accuracy", [y, p], accuracy_score(y, p))
    add(f"f1_macro_{tag}", "f1_macro", [y, p], f1_score(y, p, average="macro"))
    add(f"f1_macro_{tag}_labels_unique_y", "f1_macro", [y, p], f1_score(y, p, average="macro", labels=np.unique(y)),
        labels=np.unique(y))
    C = int(max(y.max(), p.max())) + 1
    add(f"confusion_{tag}", "confusion_matrix", [y, p], confusion_matrix(y, p, labels=np.arange(C + 1)),
        num_classes=C + 1)
    for w in [None, "linear", "quadratic"]:
        add(f"kappa_{tag}_{w}", "cohen_kappa", [y, p], cohen_kappa_score(y, p, weights=w), weights=w)
        add(f"kappa_{tag}_{w}_labels_range", "cohen_kappa", [y, p],
            cohen_kappa_score(y, p, weights=w, labels=np.arange(C)), weights=w, labels=np.arange(C))
    prf = precision_recall_fscore_support(y, p, labels=np.arange(C + 1), zero_division=0)
    add(f"prf_{tag}", "precision_recall_f1", [y, p], [np.asarray(a, dtype=float) for a in prf],
        labels=np.arange(C + 1))

# a label in `labels` that is in neither y nor pred: its F1 is 0/0 -> 0
add("f1_macro_label_in_neither", "f1_macro", [y_mc, p_mc], f1_score(y_mc, p_mc, average="macro", labels=range(7)),
    labels=np.arange(7))
# labels in a non-sorted order: weighted kappa uses positions in the list, not the label values
perm = np.array([0, 2, 1, 3, 4])
add("kappa_mc_linear_permuted_labels", "cohen_kappa", [y_mc, p_mc],
    cohen_kappa_score(y_mc, p_mc, weights="linear", labels=perm), weights="linear", labels=perm)
# labels that leave some samples out (class 4 dropped)
add("kappa_mc_quadratic_subset_labels", "cohen_kappa", [y_mc, p_mc],
    cohen_kappa_score(y_mc, p_mc, weights="quadratic", labels=[0, 1, 2, 3]), weights="quadratic", labels=[0, 1, 2, 3])
add("kappa_single_class_undefined", "cohen_kappa", [[1, 1, 1, 1], [1, 1, 1, 1]],
    cohen_kappa_score([1, 1, 1, 1], [1, 1, 1, 1]))

# ---- AUROC --------------------------------------------------------------------------------------------------
yb = rng.integers(0, 2, 400)
sb = np.round(yb * 0.8 + normal(400), 6)
add("auroc_binary", "auroc", [yb, sb], roc_auc_score(yb, sb))
sb_tied = np.round(sb * 2) / 2                           # steps of 0.5: lots of ties
add("auroc_binary_ties", "auroc", [yb, sb_tied], roc_auc_score(yb, sb_tied))
add("auroc_binary_all_tied", "auroc", [yb, np.zeros(400)], roc_auc_score(yb, np.zeros(400)))
add("auroc_binary_perfect_inverted", "auroc", [[0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]],
    roc_auc_score([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]))

ym = rng.integers(0, 4, 300)
Pm = softmax(1.5 * np.eye(4)[ym] + normal((300, 4)))
per = ovr_per_class(ym, Pm)
assert abs(per.mean() - roc_auc_score(ym, Pm, multi_class="ovr", average="macro")) < 1e-12
add("auroc_multiclass_ovr", "auroc", [ym, Pm], roc_auc_score(ym, Pm, multi_class="ovr", average="macro"))
add("auroc_multiclass_ovr_per_class", "auroc", [ym, Pm], per, average=None)
Pm_tied = np.round(Pm, 1)                                # rows no longer sum to 1, so sklearn's ovr refuses: per column
per = ovr_per_class(ym, Pm_tied)
add("auroc_multiclass_ties", "auroc", [ym, Pm_tied], per.mean())
add("auroc_multiclass_ties_per_class", "auroc", [ym, Pm_tied], per, average=None)
ya = rng.integers(0, 3, 200)                             # class 3 absent from y: its OvR AUC is undefined
Pa = softmax(np.eye(4)[ya] + normal((200, 4)))
per = ovr_per_class(ya, Pa)
assert np.isnan(per[3]) and not np.isnan(per[:3]).any()
add("auroc_multiclass_absent_class", "auroc", [ya, Pa], per[:3].mean())
add("auroc_multiclass_absent_class_per_class", "auroc", [ya, Pa], per, average=None)
y2 = rng.integers(0, 2, 300)
P2 = softmax(np.eye(2)[y2] + normal((300, 2)))
add("auroc_two_class_probs_equals_binary", "auroc", [y2, P2], roc_auc_score(y2, P2[:, 1]))

Y = (rng.random((250, 5)) < [0.1, 0.3, 0.5, 0.2, 0.4]).astype(int)
S = np.round(Y * 0.7 + normal((250, 5)), 6)
add("auroc_multilabel_macro", "auroc", [Y, S], roc_auc_score(Y, S, average="macro"))
add("auroc_multilabel_per_label", "auroc", [Y, S], roc_auc_score(Y, S, average=None), average=None)
S_tied = np.round(S)
add("auroc_multilabel_ties_per_label", "auroc", [Y, S_tied], roc_auc_score(Y, S_tied, average=None), average=None)
Yu = Y.copy(); Yu[:, 1] = 0; Yu[:, 3] = 1                # label 1 never positive, label 3 never negative
ok = [0, 2, 4]
per = np.full(5, np.nan); per[ok] = roc_auc_score(Yu[:, ok], S[:, ok], average=None)
add("auroc_multilabel_undefined_per_label", "auroc", [Yu, S], per, average=None)
add("auroc_multilabel_undefined_macro", "auroc", [Yu, S], roc_auc_score(Yu[:, ok], S[:, ok], average="macro"))
M = (rng.random((250, 5)) < 0.8).astype(int)
per = np.array([roc_auc_score(Y[M[:, c] == 1, c], S[M[:, c] == 1, c]) for c in range(5)])
add("auroc_multilabel_mask_per_label", "auroc", [Y, S], per, average=None, mask=M)

# ---- retrieval: recall@k == top-k accuracy with query i's class being item i --------------------------------
sim = normal((40, 60))
sim[np.arange(40), np.arange(40)] += 1.5; sim = np.round(sim, 6)
for k in [1, 5, 10]:
    add(f"recall_at_{k}", "recall_at_k", [sim, k],
        top_k_accuracy_score(np.arange(40), sim, k=k, labels=np.arange(60)))

# ---- classification_report ------------------------------------------------------------------------------------
def report(y, p, P, names, auc):
    C = len(names)
    pr, rc, f1, n = precision_recall_fscore_support(y, p, labels=np.arange(C), zero_division=0)
    return {"acc": accuracy_score(y, p), "f1_macro": f1_score(y, p, average="macro"), "auroc": auc,
            "kappa": cohen_kappa_score(y, p, labels=np.arange(C)),
            "kappa_quadratic": cohen_kappa_score(y, p, weights="quadratic", labels=np.arange(C)),
            "per_class": [{"class": names[c], "n": int(n[c]), "acc": rc[c] if n[c] else float("nan"),
                           "precision": pr[c], "recall": rc[c], "f1": f1[c]} for c in range(C)],
            "confusion": confusion_matrix(y, p, labels=np.arange(C))}


names = ["melanoma", "nevus", "basal cell carcinoma", "actinic keratosis"]
yr = rng.integers(0, 4, 200)
Pr = softmax(2 * np.eye(4)[yr] + normal((200, 4)))
pr_ = Pr.argmax(1)
add("report_4class", "classification_report", [yr, pr_, Pr, names],
    report(yr, pr_, Pr, names, roc_auc_score(yr, Pr, multi_class="ovr")))
yr2 = rng.integers(0, 3, 150)                            # class 3 never true, sometimes predicted
Pr2 = softmax(np.eye(4)[yr2] + normal((150, 4)))
pr2 = Pr2.argmax(1)
assert (pr2 == 3).any()
add("report_absent_class", "classification_report", [yr2, pr2, Pr2, names],
    report(yr2, pr2, Pr2, names, ovr_per_class(yr2, Pr2)[:3].mean()))

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics_goldens.json")
with open(out, "w") as f:
    json.dump({"generated_by": f"make_metrics_goldens.py, scikit-learn {sklearn.__version__}, numpy {np.__version__}",
               "arrays": arrays, "cases": cases}, f)
print(f"wrote {len(cases)} cases to {out} ({os.path.getsize(out) // 1024} KB)", file=sys.stderr)
