"""Endoscopy: Kvasir v2 (cilmp.py)."""
from common.prepare.util import class_folders, find_dir, paper_test_size, write_seeded

PAPER_COUNTS = {"kvasir": {"train": 5600, "test": 2400}}  # CILMP's dataset table (train / test)
CLASSNAMES = {  # as the official CILMP loaders spell them, in label order
    "kvasir": ["dyed lifted polyps", "dyed resection margins", "esophagitis", "normal cecum", "normal pylorus",
               "normal z-line", "polyps", "ulcerative colitis"],
}


def prepare_kvasir(src, out, **opts):
    """Kvasir v2: 8 class folders of 1000 JPEGs; seeded stratified 70/30 (5600/2400)."""
    name, names = "kvasir", CLASSNAMES["kvasir"]
    root = find_dir(src, ["kvasir-dataset-v2", ""], name, "kvasir-dataset-v2/<8 class folders>",
                    marker="polyps")
    folders = {c.replace(" ", "-"): i for i, c in enumerate(names)}
    paths, labels = class_folders(root, folders, name)
    return write_seeded(name, root, out, paths, labels, names, paper_test_size(PAPER_COUNTS[name], len(paths), 0.3),
                        "no official split: seeded stratified split, paper's 70/30", PAPER_COUNTS[name], **opts)
