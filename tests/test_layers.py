"""Layers import downward only: model and data at the bottom, train and infer above them, then posttrain, eval, and
the pipeline and command line on top; neutral helpers (common, config, rewards) below everything. Every import is
checked, those inside functions too: a lazy import is still a dependency."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanoseek"
LAYERS = {"common": 0, "config": 0, "rewards": 0, "model": 1, "data": 1, "train": 2, "infer": 2, "posttrain": 3,
          "eval": 4, "pipeline": 5, "vl_pipeline": 5, "refine": 5, "cli": 5, "__main__": 5, "": 5}
FORBIDDEN = {("eval", "posttrain")}  # evaluation measures models through infer, whatever stage made them


def part(module: str) -> str:
    """The layer-defining part of a nanoseek module name: nanoseek.posttrain.sft -> posttrain; nanoseek -> ''."""
    names = module.split(".")
    return names[1] if len(names) > 1 else ""


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("nanoseek"):
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "nanoseek"]
    return out


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("nanoseek", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        found.append((name, path))
    return found


def violations() -> list[str]:
    bad = []
    for name, path in modules():
        here = part(name)
        for line, target in imports(path):
            there = part(target)
            if there not in LAYERS or here not in LAYERS:
                bad.append(f"{path}:{line}: {name} -> {target}: a package the layer map does not know")
            elif (here, there) in FORBIDDEN:
                bad.append(f"{path}:{line}: {name} imports {target}: {here} must not use {there}")
            elif LAYERS[there] > LAYERS[here]:
                bad.append(f"{path}:{line}: {name} (layer {LAYERS[here]}) imports {target} (layer {LAYERS[there]})")
            elif LAYERS[there] == LAYERS[here] and there != here and LAYERS[here] not in (0, 5):
                bad.append(f"{path}:{line}: {name} imports its sibling {target}; move the shared part down")
    return bad


def test_layers_import_only_downward():
    assert violations() == []


def test_the_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself: an eval module importing posttrain, and infer importing train, are both reported."""
    root = tmp_path / "nanoseek"
    (root / "eval").mkdir(parents=True)
    (root / "infer").mkdir()
    (root / "eval" / "x.py").write_text("def f():\n    from nanoseek.pipeline import Run\n")
    (root / "eval" / "z.py").write_text("from nanoseek.posttrain.grpo import grpo\n")
    (root / "infer" / "y.py").write_text("import nanoseek.train.optim\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", root)
    found = violations()
    assert len(found) == 3 and "nanoseek.eval.x (layer 4) imports nanoseek.pipeline" in found[0]
    assert "eval must not use posttrain" in found[1] and "imports its sibling nanoseek.train.optim" in found[2]


LIBRARY = [name for name, _ in modules() if name != "nanoseek.__main__"]  # __main__ runs the command line


@pytest.mark.parametrize("name", LIBRARY)
def test_every_module_imports(name):
    """A broken import fails here by name (tests elsewhere must not skip over nanoseek's own modules)."""
    __import__(name)
