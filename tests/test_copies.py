"""Blocks copied on purpose between method scripts ("# Copied from <file>: <name>") must stay identical.

Each method file stands alone so it can be copied into another project; the price is duplicated code, and this
test is what keeps the duplicates from drifting apart."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARK = re.compile(r"^# Copied from ([\w./-]+\.py):\s*(\w+)\s*$", re.MULTILINE)


def _definition(path: Path, name: str) -> str:
    src = path.read_text()
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_source_segment(src, node)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.get_source_segment(src, node)
    raise AssertionError(f"{path.name}: no top-level {name}")


def test_marked_copies_are_identical():
    checked = 0
    for script in sorted(REPO.glob("*.py")):
        for src_file, name in MARK.findall(script.read_text()):
            a, b = _definition(script, name), _definition(REPO / src_file, name)
            assert a == b, f"{script.name}:{name} has drifted from {src_file}:{name}"
            checked += 1
    assert checked >= 2  # cleft.py copies map_key and load_state from cilmp.py


def test_the_marker_sits_right_above_the_copy():
    for script in sorted(REPO.glob("*.py")):
        lines = script.read_text().splitlines()
        for i, line in enumerate(lines):
            m = MARK.match(line)
            if m:
                nxt = lines[i + 1]
                assert re.match(rf"(def|class) {m.group(2)}\b|{m.group(2)} = ", nxt), f"{script.name}:{i + 1}"
