"""Zero-shot and retrieval evaluation plumbing for the chest X-ray benchmarks of GLoRIA / ALTA.

Readers for the evaluation sets as `python -m common.prepare` lays them out (and GLoRIA's / ALTA's shipped
chexpert_5x200.csv), batched embedding, class-block precision@K and the F1-fitted threshold protocol of the
RSNA zero-shot scripts. The model-side steps (prompts, encoders) stay in the method file:

    paths, labels, impressions = chexpert5x200(root)                  # 5 classes x 200 images, labels 0-4
    queries, q_labels, cand_paths, c_labels = chexpert8x200(root, "image" | "text")
    paths, labels = rsna(root, "valid" | "test")
    feats = embed(encode, items, batch_size, device, precision)       # (N, E) float32 on the CPU
    precision_table(q_feats, item_feats, q_labels, item_labels, (5, 10, 100))   # {"P@5": ..., ...}
    threshold_protocol(labels, p_positive)                            # {"AUROC", "ACC", "F1"}
"""
import numpy as np
import torch

from common import metrics as M
from common.data import CHEXPERT_FINDINGS, DataError, read_csv
from common.run import autocast

CHEXPERT5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")   # the 5x200 classes
CHEXPERT8 = ("No Finding", "Cardiomegaly", "Edema", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
             "Fracture")                                                                       # the 8x200 classes


def read_rows(path, required, what: str = "CSV") -> list:
    """A CSV with a header -> its rows as dicts; a missing file, a missing column or no rows -> DataError."""
    return [row for _, row in read_csv(path, list(required), what)[1]]


def chexpert5x200(root, impressions: bool = True) -> tuple:
    """chexpert_5x200.csv: Path, the five class columns (one 1.0 each), "Report Impression" (ALTA's copy of
    GLoRIA's file; needed for retrieval only) -> image paths, labels (N,) in CHEXPERT5 order, impressions."""
    path = root / "chexpert_5x200.csv"
    rows = read_rows(path, ["Path", *CHEXPERT5], "CheXpert 5x200 CSV")
    if impressions and "Report Impression" not in rows[0]:
        raise DataError(f"{path} has no 'Report Impression' column: retrieval needs the CSV shipped by GLoRIA / "
                        "DopamineLcy/ALTA (CheXpert5X200_dataset/chexpert_5x200.csv)")
    y = np.array([[float(r[c] or 0) for c in CHEXPERT5] for r in rows]).argmax(1)
    return [root / r["Path"] for r in rows], y, [r.get("Report Impression", "") for r in rows]


def chexpert8x200(root, queries: str) -> tuple:
    """ConVIRT's CheXpert 8x200 sets (image-retrieval/ or text-retrieval/, paths relative to `root`): query.csv
    (Variable = class name, and Path or Text), candidate.csv (CheXpert columns; the label is the argmax of the
    label columns after the 5 metadata ones, as the official iloc[:, 5:]) -> query paths or texts, their labels,
    candidate image paths, their labels; labels are CheXpert column indices (CHEXPERT_FINDINGS order)."""
    sub = root / f"{queries}-retrieval"
    cand = read_rows(sub / "candidate.csv", ["Path"], "8x200 candidate CSV")
    names = list(cand[0])[5:]
    c_label = np.array([int(np.argmax([float(r[n] or 0) for n in names])) for r in cand])
    query = read_rows(sub / "query.csv", ["Variable", "Text" if queries == "text" else "Path"], "8x200 query CSV")
    unknown = {r["Variable"] for r in query} - set(CHEXPERT8)
    if unknown or names != CHEXPERT_FINDINGS[:len(names)]:
        raise DataError(f"{sub}: query classes {sorted(unknown)} are not CheXpert 8x200 ones, or the candidate "
                        f"label columns {names} are not in CheXpert's order")
    q_label = np.array([CHEXPERT_FINDINGS.index(r["Variable"]) for r in query])
    q = [r["Text"] for r in query] if queries == "text" else [root / r["Path"] for r in query]
    return q, q_label, [root / r["Path"] for r in cand], c_label


def rsna(root, split: str) -> tuple:
    """common.prepare rsna's valid.csv / test.csv: Path, Pneumonia (0/1) -> image paths, labels (N,)."""
    rows = read_rows(root / f"{split}.csv", ["Path", "Pneumonia"], "RSNA CSV")
    return [root / r["Path"] for r in rows], np.array([int(float(r["Pneumonia"])) for r in rows])


@torch.no_grad()
def embed(encode, items, batch_size: int, device, precision: str) -> torch.Tensor:
    """encode(a list of up to batch_size items) -> (n, E), run batch by batch under autocast -> (N, E) fp32, CPU."""
    out = []
    for i in range(0, len(items), batch_size):
        with autocast(device, precision):
            out.append(encode(items[i:i + batch_size]).float().cpu())
    return torch.cat(out)


def precision_table(queries, items, query_labels, item_labels, ks) -> dict:
    """Class-block precision@K of queries x items cosine (both L2-normalised rows), as GLoRIA's / ALTA's scripts."""
    sim = (queries @ items.T).numpy()
    return {f"P@{k}": M.precision_at_k(sim, query_labels, item_labels, k) for k in ks}


def threshold_protocol(y, p_pos, folds: int = 10, seed: int = 0, step: float = 0.005) -> dict:
    """AUROC of p_pos, and ACC / F1 at a threshold fitted on 9 of 10 stratified folds and measured on the 10th,
    averaged (ALTA's RSNA_zeroshot.py). NOTE the fit maximises F1 (the official variable is called current_acc
    but holds F1); ties go to the lowest threshold of the grid 0, step, ..., 1. The folds are a seeded stratified
    split, not scikit-learn's StratifiedKFold assignment, so ACC / F1 can differ from the official ones in the
    3rd digit."""
    y, p_pos = np.asarray(y).astype(bool), np.asarray(p_pos, dtype=np.float64)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    for cls in (False, True):
        idx = np.flatnonzero(y == cls)
        fold[rng.permutation(idx)] = np.arange(len(idx)) % folds
    grid = np.arange(0, 1 + step, step)

    def acc_f1(yy, pp, t):
        pred = pp > t
        tp, fp, fn = (yy & pred).sum(), (pred & ~yy).sum(), (yy & ~pred).sum()
        prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        return (yy == pred).mean(), (2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0)

    accs, f1s = [], []
    for k in range(folds):
        tr, te = fold != k, fold == k
        best_t = max(grid, key=lambda t: (acc_f1(y[tr], p_pos[tr], t)[1], -t))
        a, f = acc_f1(y[te], p_pos[te], best_t)
        accs.append(a)
        f1s.append(f)
    return {"AUROC": M.auroc(y.astype(int), p_pos), "ACC": float(np.mean(accs)), "F1": float(np.mean(f1s))}
