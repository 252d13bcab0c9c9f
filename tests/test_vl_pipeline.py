"""`nanoseek run --recipe vl-debug`: every VL stage end to end into one run directory (text model, image data with
its curation manifest, VL checkpoint, alignment, joint training, evaluation, report card), loadable by
`nanoseek.load`; bad [vl] fields are refused naming the field."""

import json
import os
import subprocess
import sys

import pytest

import nanoseek
from nanoseek.config import load_recipe
from nanoseek.model.vl import VLModel
from nanoseek.vl_pipeline import check_vl_recipe


@pytest.mark.slow  # ~40 s on a shared 2-core CPU (the text data set is built once, under ~/.cache/nanoseek)
def test_vl_debug_run(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "nanoseek", "run", "--recipe", "vl-debug", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("data", "pretrain", "sft", "vl_data", "vl_init", "vl_align", "vl_sft", "vl_grpo", "vl_eval",
                  "vl_report"):
        assert (out / stage / "stage.json").exists(), stage
    manifest = json.loads((out / "vl_data" / "curated" / "manifest.json").read_text())
    t = manifest["totals"]
    assert t["records"] == t["kept"] + t["removed"] + t["rejected"] and t["kept"] > 0
    report = json.loads((out / "vl_report.json").read_text())
    assert set(report["image_tasks"]) >= {"ocr", "chart_largest"} and "arithmetic" in report["text_pass@1"]["after"]
    assert (out / "report_plots" / "vl_samples.png").stat().st_size > 0
    model = nanoseek.load(out / "vl_sft")
    assert isinstance(model, VLModel)


def test_bad_vl_fields_are_named():
    recipe = load_recipe("vl-debug")
    check_vl_recipe(recipe)
    with pytest.raises(ValueError, match=r"\[vl\] preset='nope'"):
        check_vl_recipe({**recipe, "vl": {**recipe["vl"], "preset": "nope"}})
    with pytest.raises(ValueError, match=r"\[vl\] train_images"):
        check_vl_recipe({**recipe, "vl": {**recipe["vl"], "train_images": {"faces": 3}}})
    with pytest.raises(ValueError, match=r"\[vl_sft\] train"):
        check_vl_recipe({**recipe, "vl_sft": {**recipe["vl_sft"], "train": ["eyes"]}})
