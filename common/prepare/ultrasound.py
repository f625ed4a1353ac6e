"""Fetal ultrasound: FETAL_PLANES_DB (cilmp.py)."""
from common.data import DataError
from common.prepare.util import Output, check_exists, find_file, finish, read_csv, write_classification

PAPER_COUNTS = {"fetal-us": {"train": 7129, "test": 5271}}  # CILMP's dataset table (train / test)
CLASSNAMES = {  # as the official CILMP loaders spell them, in label order
    "fetal-us": ["Fetal brain", "Fetal femur", "Fetal abdomen", "Fetal thorax", "Maternal cervix",
                 "Other planes"],
}


def prepare_fetal_us(src, out, **opts):
    """FETAL_PLANES_DB: FETAL_PLANES_DB_data.csv (';'-separated, Train 1/0) + Images/<Image_name>.png."""
    name, names = "fetal-us", CLASSNAMES["fetal-us"]
    csv_path = find_file(src, ["FETAL_PLANES_DB_data.csv", "*/FETAL_PLANES_DB_data.csv"], name,
                         "FETAL_PLANES_DB_data.csv and Images/")
    img_dir = csv_path.parent / "Images"
    plane_to_class = {"Fetal brain": 0, "Fetal femur": 1, "Fetal abdomen": 2, "Fetal thorax": 3,
                      "Maternal cervix": 4, "Other": 5}
    warnings = []
    rows = read_csv(csv_path, ["Image_name", "Plane", "Train"], unique=["Image_name"], warnings=warnings)
    raw = {"train": [], "val": [], "test": []}
    for r in rows:
        if r["Plane"] not in plane_to_class:
            raise DataError(f"{csv_path}: unknown Plane {r['Plane']!r} for {r['Image_name']}")
        if r["Train"] not in ("0", "1"):
            raise DataError(f"{csv_path}: Train must be 1 or 0, got {r['Train']!r} for {r['Image_name']}")
        raw["train" if r["Train"] == "1" else "test"].append((img_dir / f"{r['Image_name']}.png",
                                                              plane_to_class[r["Plane"]]))
    check_exists([p for v in raw.values() for p, _ in v], name)
    with Output(out, csv_path.parent, **opts) as o:
        items = {s: [(o.place(p), y, names[y]) for p, y in v] for s, v in raw.items()}
        summary = write_classification(o, name, items, names, notes=[
            "official split from the Train column; Plane 'Other' is the class 'Other planes'"], warnings=warnings)
        finish(o, name, summary, PAPER_COUNTS.get(name))
    return summary
