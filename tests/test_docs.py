"""The README's file list says what each file does today: every module, bench and recipe, described by the first
sentence of its own docstring (or header comment), whole. A file added, removed or redescribed without the README
fails here; `python -m tests.test_docs` rewrites the list."""

import ast
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WIDTH, NAME = 120, 43  # line width; the column where descriptions start
OTHER = {"nanoseek/infer/serve/index.html": "The web chat page `nanoseek serve` serves at /.",
         "tests/": "Mirrors the package; `slow` marks the long ones.",
         ".ci/run": "CI: the CPU torch wheel, the test extras, then the README's test command."}


def first_sentence(text: str) -> str:
    """The first sentence of a docstring or comment block: up to the first full stop that ends a sentence (not one
    inside a name like nanoseek.load or a number like 1.5), or the whole first paragraph."""
    paragraph = " ".join(text.strip().split("\n\n")[0].split())
    match = re.search(r"\.(\s|$)", paragraph)
    return paragraph[:match.start() + 1] if match else paragraph


def describe(path: Path) -> str:
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, f"{path.relative_to(ROOT)} has no module docstring"
        return first_sentence(doc)
    comments = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        comments.append(line.lstrip("#").strip())
    assert comments, f"{path.relative_to(ROOT)} has no header comment"
    return first_sentence("\n".join(comments))


def files() -> list[Path]:
    package = sorted(p for p in (ROOT / "nanoseek").rglob("*.py") if "__pycache__" not in p.parts)
    return package + sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "recipes").glob("*.toml"))


def file_list() -> str:
    rows = [(str(p.relative_to(ROOT)), describe(p)) for p in files()] + list(OTHER.items())
    rows.sort(key=lambda r: (not r[0].startswith("nanoseek/"), r[0].startswith(("tests", ".ci")), r[0]))
    lines = []
    for name, text in rows:
        wrapped = textwrap.wrap(text, WIDTH - NAME) or [""]
        lines.append(f"{name:<{NAME}}{wrapped[0]}")
        lines += [" " * NAME + more for more in wrapped[1:]]
    return "\n".join(lines)


def readme_block() -> tuple[int, int]:
    """Start and end offsets of the code block under '## Files' in the README."""
    text = README.read_text()
    section = text.index("## Files")
    start = text.index("```\n", section) + 4
    return start, text.index("```", start)


def test_the_readme_file_list_is_the_files_and_their_docstrings():
    start, end = readme_block()
    assert README.read_text()[start:end].rstrip("\n") == file_list(), "run `python -m tests.test_docs`"


def test_first_sentence_stops_at_a_sentence_end_only():
    assert first_sentence("A 1.5M model. More.") == "A 1.5M model."
    assert first_sentence("Calls nanoseek.load (see\nthere). Then") == "Calls nanoseek.load (see there)."
    assert first_sentence("No stop here\n\nsecond paragraph.") == "No stop here"


if __name__ == "__main__":
    start, end = readme_block()
    text = README.read_text()
    README.write_text(text[:start] + file_list() + "\n" + text[end:])
    print(f"rewrote the file list in {README}")
