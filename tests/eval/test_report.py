"""Report card: report.json / report.md / PNGs written from a small synthetic run directory."""

import json
from pathlib import Path

import pytest

from nanoseek.eval.metrics import bootstrap_ci, paired_bootstrap_ci, stratified_bootstrap_ci
from nanoseek.eval.report import MODELS, max_violation, write_report

TASKS = ("arithmetic", "logic")


def write_metrics(path: Path, records: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def scores(p: float) -> list[float]:
    """20 problems' pass@1 with mean p: the first round(20 p) solved, the rest not."""
    return [1.0] * round(20 * p) + [0.0] * (20 - round(20 * p))


def eval_result(pass1: dict[str, float], bpb: float, acceptance: float | None = None) -> dict:
    """The shape `evaluate()` returns (only the parts the report reads)."""
    tasks = {t: {"n": 20, "k": 4, "pass@1": p, "pass@1_ci": list(bootstrap_ci(scores(p))),
                 "pass@k": min(1.0, p + 0.2), "maj@k": p, "format": 0.9,
                 "hallucination": 0.1, "hallucination_verified": 0.05, "abstention": 0.2, "greedy": p,
                 "consistency": 0.8, "per_problem": {"ids": [f"{t}-{i}" for i in range(20)], "pass@1": scores(p)}}
             for t, p in pass1.items()}
    tasks["nim"] = {"games": 4, "win_vs_optimal": 0.25, "draw_vs_optimal": 0.0, "loss_vs_optimal": 0.75,
                    "forfeit_vs_optimal": 0.5, "win_vs_random": 0.5, "win_vs_random_ci": [0.0, 1.0],
                    "draw_vs_random": 0.0, "loss_vs_random": 0.5, "forfeit_vs_random": 0.25,
                    "forfeit_vs_random_ci": [0.0, 0.75], "optimal_move_rate": 0.4,
                    "optimal_move_rate_ci": [0.2, 0.6]}
    speed = {"tokens_per_s": 1000.0, "latency_b1_s": 0.5, "tokens_per_s_b1": 80.0}
    if acceptance is not None:
        speed["mtp_acceptance"] = acceptance
    return {"model": "x", "checkpoint": "x", "template": "chat", "settings": {"k": 4}, "tasks": tasks, "bpb": bpb,
            "speed": speed}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    pre = []
    for step in range(1, 21):
        # layer 0 perfectly balanced, layer 1 skewed: MaxVio 0 and (20 - 10) / 10 = 1
        pre.append({"step": step, "loss": 6.0 - 0.1 * step, "mtp_loss": 6.5 - 0.1 * step, "max_vio_mean": 0.5,
                    "expert_loads": [[10, 10, 10, 10], [20, 10, 5, 5]], "max_vio": [0.0, 1.0]})
        if step % 10 == 0:
            pre.append({"step": step, "val_loss": 5.0 - 0.05 * step, "val_bpb": 2.0, "val_max_vio_mean": 0.25,
                        "val_mtp_acc": [0.3]})
    write_metrics(run / "pretrain", pre)
    write_metrics(run / "sft", [{"event": "data", "step": 0, "train_conversations": 10}]
                  + [{"step": s, "loss": 2.0 - 0.1 * s, "val_loss": 2.1 - 0.1 * s} for s in range(1, 6)])
    write_metrics(run / "grpo_zero", [{"step": s, "loss": 0.0, "reward": 0.1 * s, "accuracy": 0.05 * s,
                                       "completion_length": 10.0 + 2 * s, "kl": 0.01 * s, "eval/pass@1": 0.1 * s}
                                      for s in range(1, 11)])
    return run


STAGES = [{"name": "pretrain", "wall_seconds": 100.0, "steps": 20},
          {"name": "sft", "wall_seconds": 20.0},
          {"name": "r1_zero", "wall_seconds": 60.0, "dir": "grpo_zero"},
          {"name": "r1", "wall_seconds": 50.0},  # no metrics.jsonl: must simply be skipped
          {"name": "distill", "wall_seconds": 30.0},
          {"name": "student_rl", "wall_seconds": 30.0, "dir": "student_rl",
           "metrics": {"heldout_pass@1_start": 0.9, "heldout_pass@1_end": 0.1, "trained_on": "arithmetic level 1"}}]
EVALS = {
    "student": eval_result({"arithmetic": 0.45, "logic": 0.55}, 2.2),
    "base": eval_result({"arithmetic": 0.10, "logic": 0.50}, 2.0, acceptance=0.6),
    "sft": eval_result({"arithmetic": 0.30, "logic": 0.50}, 2.1),
    "r1_zero": eval_result({"arithmetic": 0.40, "logic": 0.60}, 2.3),
    "r1": eval_result({"arithmetic": 0.60, "logic": 0.70}, 2.4),
    "student_rl": eval_result({"arithmetic": 0.15, "logic": 0.45}, 2.5),
}
# the eval stage's paired measurement of an RL stage: its start and end model on its trained task
RL = {"student_rl": {"trained_on": "arithmetic level 1", "tasks": ["arithmetic"], "start_model": "student_base",
                     "start": eval_result({"arithmetic": 0.25}, 2.0), "end": eval_result({"arithmetic": 0.5}, 2.0)}}


def test_max_violation():
    assert max_violation([10, 10, 10, 10]) == 0.0
    assert max_violation([20, 10, 5, 5]) == pytest.approx(1.0)
    assert max_violation([0, 0]) == 0.0


def test_report_json_structure_and_numbers(run_dir):
    report = write_report(run_dir, STAGES, EVALS, config={"name": "debug", "pretrain": {"max_steps": 20}}, rl=RL)
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk == report
    assert list(report["eval"]) == list(MODELS)  # pipeline order, whatever order the results came in
    for model, tasks in report["eval"].items():
        for t in TASKS:
            assert set(tasks[t]) >= {"pass@1", "pass@k", "maj@k", "format"}
            assert tasks[t]["pass@1"] == EVALS[model]["tasks"][t]["pass@1"]
            assert tasks[t]["pass@1_ci"] == EVALS[model]["tasks"][t]["pass@1_ci"]
    assert [s["name"] for s in report["stages"]] == [s["name"] for s in STAGES]
    assert report["total_wall_seconds"] == pytest.approx(290.0)
    assert report["config"]["name"] == "debug" and report["hardware"]["cpu_count"] >= 1
    assert report["bpb"]["r1"] == 2.4 and report["speed"]["base"]["mtp_acceptance"] == 0.6
    # lifts: r1_zero over base (+0.30, +0.10) and r1 over sft (+0.30, +0.20)
    assert report["lift"]["r1_zero_vs_base"]["arithmetic"] == pytest.approx(0.30)
    assert report["lift"]["r1_zero_vs_base"]["mean"] == pytest.approx(0.20)
    assert report["lift"]["r1_vs_sft"]["mean"] == pytest.approx(0.25)
    # the mean's interval: per-problem differences, resampled within each task
    diffs = [[e - b for b, e in zip(scores(base), scores(rl), strict=True)] for base, rl in ((0.1, 0.4), (0.5, 0.6))]
    assert report["lift"]["r1_zero_vs_base"]["mean_ci"] == pytest.approx(list(stratified_bootstrap_ci(diffs)))
    # on the task an RL stage trained on: the eval stage's paired measurement, not the stage's own curve
    start, end = scores(0.25), scores(0.5)
    assert report["rl_task_lift"] == {"student_rl": {
        "trained_on": "arithmetic level 1", "start_model": "student_base", "start": 0.25, "end": 0.5,
        "lift": 0.25, "start_ci": list(bootstrap_ci(start)), "end_ci": list(bootstrap_ci(end)),
        "lift_ci": list(paired_bootstrap_ci(start, end)), "n_problems": 20, "k": 4}}
    lo, hi = report["rl_task_lift"]["student_rl"]["lift_ci"]
    assert 0.0 < lo < 0.25 < hi <= 0.5
    # training curves summarised from each stage's metrics.jsonl (the r1_zero stage lives in grpo_zero/)
    assert report["training"]["pretrain"]["loss"]["last"] == pytest.approx(6.0 - 0.1 * 20 + 0.05)  # last 2 of 20
    assert report["training"]["r1_zero"]["completion_length"]["first"] == pytest.approx(12.0)
    assert report["training"]["r1_zero"]["completion_length"]["last"] == pytest.approx(30.0)
    assert "r1" not in report["training"]
    assert report["balance"]["pretrain"]["max_vio_per_layer"] == pytest.approx([0.0, 1.0])
    assert report["balance"]["pretrain"]["val_max_vio_mean"] == 0.25


def test_paper_rows_carry_measured_values(run_dir):
    rows = {r["topic"]: r for r in write_report(run_dir, STAGES, EVALS, plots=False)["paper_comparison"]}
    assert all({"paper", "source", "measured"} <= set(r) for r in rows.values())
    assert "validation MaxVio 0.250" in rows["Load balance: MaxVio with auxiliary-loss-free balancing"]["measured"]
    mtp = rows["MTP: acceptance of the drafted second token"]["measured"]
    assert "0.300" in mtp and "base: speculative draft acceptance 0.600" in mtp
    assert "0.300 -> 0.500 (+20.0 [+" in rows["r1_zero pass@1 lift over base"]["measured"]
    assert "+25.0 [+" in rows["r1 pass@1 lift over sft"]["measured"]
    assert "12 -> 30 tokens over 10 steps" in rows["Response length grows during RL"]["measured"]
    distill = rows["Distillation vs RL for small models"]["measured"]
    assert "student (distilled) pass@1 0.500" in distill and "student_rl (GRPO, same wall time) pass@1 0.300" in distill
    assert "pass@1 0.300 -> 0.500" in rows["RL sharpens the output distribution"]["measured"]


def test_report_markdown_and_plots(run_dir):
    report = write_report(run_dir, STAGES, EVALS, rl=RL)
    plots = {Path(p).name for p in report["plots"]}
    assert {"pass_at_1.png", "rl_lift.png", "loss.png", "val_loss.png", "reward.png", "accuracy.png",
            "completion_length.png", "kl.png", "heldout_pass1.png", "expert_load_pretrain.png"} <= plots
    for p in report["plots"]:
        assert (run_dir / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run_dir / "report.md").read_text()
    for heading in ("# nanoseek report card: `run`",
                    "## Stages", "## Held-out pass@1 by model", "## RL lift on the trained task",
                    "## All metrics by model", "## Games",
                    "## DeepSeek reported vs this run", "## Training curves", "## Expert load", "## Hardware"):
        assert heading in md
    for p in report["plots"]:
        assert f"]({p})" in md  # every plot is linked from the markdown
    # pass@1 per task and the mean, each with its interval
    ci = {t: report["eval"]["r1_zero"][t]["pass@1_ci"] for t in TASKS}
    mean_lo, mean_hi = stratified_bootstrap_ci([scores(0.4), scores(0.6)])
    assert (f"| r1_zero | 0.400 [{ci['arithmetic'][0]:.3f}, {ci['arithmetic'][1]:.3f}] | "
            f"0.600 [{ci['logic'][0]:.3f}, {ci['logic'][1]:.3f}] | 0.500 [{mean_lo:.3f}, {mean_hi:.3f}] |") in md
    lo, hi = report["lift"]["r1_zero_vs_base"]["mean_ci"]
    assert f"**r1_zero vs base** +20.0 [{lo * 100:+.1f}, {hi * 100:+.1f}]" in md
    lift = report["rl_task_lift"]["student_rl"]
    assert (f"| student_rl | arithmetic level 1 | 20 × 4 | student_base | 0.250 [{lift['start_ci'][0]:.3f}, "
            f"{lift['start_ci'][1]:.3f}] | 0.500 [{lift['end_ci'][0]:.3f}, {lift['end_ci'][1]:.3f}] | "
            f"+25.0 [{lift['lift_ci'][0] * 100:+.1f}, {lift['lift_ci'][1] * 100:+.1f}] |") in md
    assert "| r1 | nim | 0.250 | 0.000 | 0.500 [0.000, 1.000] | 0.000 | 0.250 [0.000, 0.750] | 0.400 [0.200, " \
           "0.600] |" in md
    assert not list(run_dir.glob(".*"))  # no temporary files left behind


def test_report_reads_eval_results_from_the_run(run_dir):
    for model, result in EVALS.items():
        (run_dir / "eval" / model).mkdir(parents=True)
        (run_dir / "eval" / model / "results.json").write_text(json.dumps(result))
    report = write_report(run_dir, STAGES, plots=False)
    assert list(report["eval"]) == list(MODELS)
    assert report["eval"]["r1"]["logic"]["pass@1"] == 0.70


def test_report_rejects_bad_inputs(run_dir):
    with pytest.raises(ValueError, match=r"stages\[1\] needs a 'name' string and a 'wall_seconds' number"):
        write_report(run_dir, [STAGES[0], {"name": "sft"}], EVALS, plots=False)
    with pytest.raises(ValueError, match=r"evaluation results of \['base'\] have no 'tasks'"):
        write_report(run_dir, STAGES, {"base": {"pass@1": 0.5}}, plots=False)
    (run_dir / "pretrain" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{broken\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        write_report(run_dir, STAGES, EVALS, plots=False)


def test_rl_lift_needs_the_same_problems(run_dir):
    other = eval_result({"arithmetic": 0.5}, 2.0)
    other["tasks"]["arithmetic"]["per_problem"]["ids"][0] = "arithmetic-x"
    with pytest.raises(ValueError, match="arithmetic: the two models were evaluated on different problems"):
        write_report(run_dir, STAGES, EVALS, plots=False, rl={"student_rl": {**RL["student_rl"], "end": other}})
