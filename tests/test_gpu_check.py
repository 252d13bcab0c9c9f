"""bench/gpu_check.py on the CPU at smoke sizes: every part runs and reports, so that the script works the first
time it meets a GPU (the GPU machine is lent by chance, for minutes)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    parts = results["parts"]
    assert list(parts) == ["correctness", "distributed", "mfu", "inference", "fp8"]
    assert {name: r["status"] for name, r in parts.items()} == dict.fromkeys(parts, "ok")
    # the same device on both sides: the comparisons must come out exact
    c = parts["correctness"]
    assert c["logits_max_abs_diff"] == 0 and c["train_max_rel_diff"] == 0 and c["greedy_identical"]
    assert parts["mfu"]["tokens_per_s"] > 0 and parts["mfu"]["ours_over_peer"] > 0
    fp8 = parts["fp8"]
    assert fp8["blockwise_kernel"] is False and fp8["gemm_rel_err_vs_emulation"] == 0  # the CPU emulates
    assert 0 < fp8["gemm_rel_err_vs_fp32"] < 0.1 and fp8["fp8_modules"] > 0
    assert set(parts["inference"]) >= {"b1", "b4"}
    assert parts["distributed"]["backend"] == "gloo" and parts["distributed"]["resume_rel_diff"] <= 1e-6
    assert "| correctness | ok |" in proc.stdout


def test_gpu_check_refuses_a_missing_gpu_and_unknown_parts(tmp_path):
    run = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path / "r.json")]
    proc = subprocess.run([*run, "--device", "cpu", "--parts", "nope"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--parts: unknown nope" in proc.stderr
    import torch
    if not torch.cuda.is_available():
        proc = subprocess.run(run, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "no GPU" in proc.stderr
