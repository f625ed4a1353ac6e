"""The one copy check. Each method file stands alone so it can be copied into another project; the price is model
blocks duplicated on purpose between method files, marked on the line above the definition with

    # Copied from <canonical file>: <Name>

This test keeps those copies from drifting and from multiplying unseen:
  - a marked copy is identical, comments included, to the definition in the file it names;
  - the file it names holds the original, not a marked copy itself (no copies of copies);
  - a top-level function or class whose code (comments and layout aside) also stands in another method file
    must be marked in all but one of them: an unmarked twin is either a copy to mark or code for common/.
"""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MARK = re.compile(r"^# Copied from ([\w./-]+\.py):\s*(\w+)\s*$")
MIN_LINES = 3  # one- and two-line helpers (a property, a lambda-like def) may coincide without being copies


def _definitions(src: str) -> dict:
    """name -> (source text as written, code with comments/layout normalised, marker (file, name) or None)."""
    lines = src.splitlines()
    out = {}
    body = ast.parse(src).body
    for k, node in enumerate(body):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        # the marker goes on the line above the definition, or above its decorators
        m = next((m for m in (MARK.match(lines[i - 2]) if i >= 2 else None for i in (first, node.lineno)) if m), None)
        parts = [node]  # a table built in steps (NAME = {...} then NAME |= {...}) is one definition
        for nxt in body[k + 1:]:
            if not (isinstance(nxt, ast.AugAssign) and isinstance(nxt.target, ast.Name) and nxt.target.id == name):
                break
            parts.append(nxt)
        text = "\n".join(x for i, part in enumerate(parts)  # decorators included, blank lines between steps not
                         for x in lines[(first if i == 0 else part.lineno) - 1:part.end_lineno] if not MARK.match(x))
        out[name] = (text, "\n".join(map(ast.unparse, parts)), (m.group(1), m.group(2)) if m else None, node)
    return out


def copy_problems(files: dict) -> list:
    """files: {file name: source}. Every problem as one line (empty list = all good)."""
    defs = {f: _definitions(src) for f, src in files.items()}
    problems = []
    for f, src in files.items():  # a marker must sit right above a definition of the name it gives
        names = {n for n, d in defs[f].items() if d[2]}
        for i, line in enumerate(src.splitlines(), 1):
            m = MARK.match(line)
            if m and m.group(2) not in names:
                problems.append(f"{f}:{i}: marker for {m.group(2)} is not right above a definition of {m.group(2)}")
    for f, found in defs.items():
        for name, (text, _, mark, _) in found.items():
            if mark is None:
                continue
            src_file, src_name = mark
            if src_name != name:
                problems.append(f"{f}: {name} is marked as a copy of {src_file}: {src_name} (names must match)")
            elif src_file not in defs or name not in defs[src_file]:
                problems.append(f"{f}: {name} is marked as copied from {src_file}, which has no top-level {name}")
            elif defs[src_file][name][2] is not None:
                problems.append(f"{f}: {name} is a copy of a copy ({src_file} marks its {name} as copied from "
                                f"{defs[src_file][name][2][0]}); copy from the canonical file")
            elif defs[src_file][name][0] != text:
                problems.append(f"{f}: {name} has drifted from {src_file}: {name}")
    seen = {}  # normalised code -> [(file, name, marked)]
    for f, found in defs.items():
        for name, (_, code, mark, node) in found.items():
            if isinstance(node, ast.Assign) or code.count("\n") + 1 < MIN_LINES:
                continue
            seen.setdefault(code, []).append((f, name, mark is not None))
    for places in seen.values():
        unmarked = [(f, n) for f, n, marked in places if not marked]
        if len({f for f, _, _ in places}) > 1 and len(unmarked) > 1:
            problems.append("unmarked twins: " + ", ".join(f"{f}: {n}" for f, n in unmarked) +
                            " (mark the copies '# Copied from <canonical file>: <name>', or move plumbing to common/)")
    return problems


def _method_files() -> dict:
    return {p.name: p.read_text() for p in sorted(REPO.glob("*.py"))}


def test_the_repository_has_no_copy_problems():
    files = _method_files()
    assert copy_problems(files) == []


def test_marked_copies_exist():
    marks = [m for src in _method_files().values() for m in map(MARK.match, src.splitlines()) if m]
    assert len(marks) >= 1  # the new method files copy blocks from cleft.py, cilmp.py and medct_lora.py


BLOCK = '''
class Block(nn.Module):
    """A block."""

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)  # a comment

    def forward(self, x):
        return self.fc(x)
'''


def test_the_check_catches_an_unmarked_twin_a_drifted_copy_and_a_copy_of_a_copy():
    assert copy_problems({"a.py": BLOCK, "b.py": "# Copied from a.py: Block" + BLOCK}) == []
    # the same code without a marker, even laid out and commented differently
    twin = BLOCK.replace("  # a comment", "").replace("self.fc(x)", "self.fc( x )  # same code")
    assert any("unmarked twins: a.py: Block, b.py: Block" in p for p in copy_problems({"a.py": BLOCK, "b.py": twin}))
    drifted = "# Copied from a.py: Block" + BLOCK.replace("return self.fc(x)", "return self.fc(x) * 2")
    assert any("drifted" in p for p in copy_problems({"a.py": BLOCK, "b.py": drifted}))
    comment_only = "# Copied from a.py: Block" + BLOCK.replace("a comment", "another comment")
    assert any("drifted" in p for p in copy_problems({"a.py": BLOCK, "b.py": comment_only}))
    copy = "# Copied from a.py: Block" + BLOCK
    assert any("copy of a copy" in p for p in copy_problems({"a.py": BLOCK, "b.py": copy,
                                                              "c.py": "# Copied from b.py: Block" + BLOCK}))
    table = 'MAP = {"a": "b"}\nMAP |= {"c": None}  # a note\n'
    assert copy_problems({"a.py": table, "b.py": "# Copied from a.py: MAP\n" + table.replace("\nMAP |=", "\n\nMAP |=")}) == []
    assert any("drifted" in p for p in copy_problems({"a.py": table, "b.py": "# Copied from a.py: MAP\n" +
                                                       table.replace("a note", "another note")}))
    assert any("not right above" in p for p in copy_problems({"a.py": BLOCK, "b.py": "# Copied from a.py: Block\n\n"
                                                              "x = 1\n" + BLOCK}))


@pytest.mark.parametrize("planted", ["cleft.py", "cilmp.py"])
def test_a_planted_unmarked_duplicate_in_the_repository_fails(planted):
    files = _method_files()
    donor = "cilmp.py" if planted == "cleft.py" else "cleft.py"
    tree = ast.parse(files[donor])
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno >= 5
                and n.name not in _definitions(files[planted]))
    files[planted] += "\n\n" + ast.get_source_segment(files[donor], node) + "\n"
    assert any(node.name in p and "unmarked twins" in p for p in copy_problems(files))
