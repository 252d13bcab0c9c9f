"""metrics.jsonl writing, reading (torn lines), resume truncation, MFU and plots."""

import json

import pytest
import torch

from nanoseek.train.metrics import MetricsWriter, matmul_peak_flops, mfu, plot_metrics, read_metrics


def test_writer_appends_full_precision_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    w = MetricsWriter(path)
    w.write({"step": 1, "loss": 1 / 3})
    w.write({"step": 2, "loss": 0.1 + 0.2})
    w.close()
    assert read_metrics(path) == [{"step": 1, "loss": 1 / 3}, {"step": 2, "loss": 0.1 + 0.2}]


def test_non_finite_values_are_refused(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl")
    with pytest.raises(ValueError):
        w.write({"step": 1, "loss": float("nan")})


def test_torn_last_line_is_ignored_but_a_bad_middle_line_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1}\n{oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        read_metrics(path)


def test_resume_drops_lines_after_the_checkpoint_step(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 8)) + '{"step": 8,')
    w = MetricsWriter(path, resume_step=5)
    w.write({"step": 6, "loss": 60.0})
    w.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                                                     (5, 5.0), (6, 60.0)]


def test_mfu_and_measured_cpu_peak():
    assert mfu(1000.0, 6e6, 6e9 * 2) == pytest.approx(0.5)
    peak = matmul_peak_flops("cpu", torch.float32)
    assert 1e8 < peak < 1e14  # a CPU does between 0.1 GFLOP/s and 100 TFLOP/s


def test_plots_are_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "m.jsonl"
    w = MetricsWriter(path)
    for s in range(1, 6):
        w.write({"step": s, "loss": 5.0 - s / 2, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0,
                 "max_vio_mean": 0.5})
    w.write({"step": 5, "val_loss": 3.0, "val_max_vio_mean": 0.2})
    w.close()
    written = plot_metrics(path, tmp_path / "plots")
    assert {p.name for p in written} == {"loss.png", "lr.png", "grad_norm.png", "max_vio.png", "throughput.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
