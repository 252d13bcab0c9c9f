"""`nanoseek run`: the debug recipe end to end (every stage, the report card), a re-run that skips every finished
stage, an interrupted run that resumes; and the recipe checks that fail before any training starts."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

from nanoseek.cli import main as cli
from nanoseek.config import RECIPE_DIR, load_recipe
from nanoseek.eval.report import MODELS
from nanoseek.pipeline import STAGES, check_recipe, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
STAGE_NAMES = [name for name, _ in STAGES]
TEMPLATES = {"base": "r1_zero", "r1_zero": "r1_zero", "sft": "chat", "r1": "chat", "student": "chat",
             "student_rl": "r1_zero"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The debug pipeline, run once through the command line: (run directory, wall seconds)."""
    out = tmp_path_factory.mktemp("pipeline") / "debug"
    start = time.perf_counter()
    assert cli(["run", "--recipe", "debug", "--out", str(out), "--no-progress"]) == 0
    return out, time.perf_counter() - start


def test_debug_pipeline_writes_every_stage_and_the_report(run):
    out, seconds = run
    assert seconds < 180
    stages = {name: json.loads((out / name / "stage.json").read_text()) for name in STAGE_NAMES}
    for name, stage in stages.items():
        assert stage["name"] == name and stage["wall_seconds"] > 0
        if "checkpoint" in stage:
            assert (out / stage["checkpoint"] / "model.safetensors").exists()
    for name in ("r1_zero", "r1"):
        assert {"steps", "heldout_pass@1_start", "heldout_pass@1_end"} <= set(stages[name]["metrics"])
    assert stages["rejection"]["metrics"]["reasoning_kept"] > 0
    # the student's two roads start from one pretrained student base and cost the same wall time
    student_base = json.loads((out / stages["student_base"]["checkpoint"] / "config.json").read_text())
    assert student_base["hidden_size"] == 64  # the debug preset, not the teacher's model
    assert stages["student_rl"]["metrics"]["time_budget_s"] == pytest.approx(
        stages["rejection"]["wall_seconds"] + stages["distill"]["wall_seconds"])
    for name, table in (("distill", "distill_sft"), ("student_rl", "grpo_student")):
        recipe = json.loads((out / stages[name]["checkpoint"] / "nanoseek.json").read_text())["recipe"]
        assert Path(recipe[table]["init"]).resolve() == (out / stages["student_base"]["checkpoint"]).resolve()

    report = json.loads((out / "report.json").read_text())
    assert list(report["eval"]) == list(MODELS)
    tasks = load_recipe("debug")["eval"]["tasks"]
    for results in report["eval"].values():
        assert list(results) == tasks
        for task in ("arithmetic", "logic"):
            assert 0.0 <= results[task]["pass@1"] <= 1.0 and "maj@k" in results[task]
            lo, hi = results[task]["pass@1_ci"]
            assert lo <= results[task]["pass@1"] <= hi
        assert "win_vs_optimal" in results["nim"] and "win_vs_random_ci" in results["nim"]
    assert [s["name"] for s in report["stages"]] == STAGE_NAMES[:-1]  # all but the report itself
    assert all(s["wall_seconds"] > 0 for s in report["stages"])
    assert set(report["lift"]) == {"r1_zero_vs_base", "r1_vs_sft"}
    # each RL stage's lift: its start and end model on the same rl_n problems of what it trained on, from the
    # eval stage; where a main evaluation holds exactly those problems (debug: rl_n = n) it is reused
    assert set(report["rl_task_lift"]) == {"r1_zero", "r1", "student_rl"}
    rl = stages["eval"]["rl"]
    assert (rl["r1_zero"]["start"], rl["r1_zero"]["end"]) == ("eval/base/results.json", "eval/r1_zero/results.json")
    assert rl["r1"]["start"] == "eval/sft/results.json"
    assert rl["student_rl"]["start"] == "eval/rl/student_rl/start/results.json"  # the student base: evaluated here
    student_base = json.loads((out / rl["student_rl"]["start"]).read_text())
    assert student_base["template"] == "r1_zero" and list(student_base["tasks"]) == ["logic"]
    expected = {"r1_zero": ("arithmetic level 1", "base"), "r1": ("arithmetic level 1", "sft"),
                "student_rl": ("logic level 1", "student_base")}
    for name, (trained_on, start_model) in expected.items():
        lift = report["rl_task_lift"][name]
        assert (lift["trained_on"], lift["start_model"], lift["n_problems"], lift["k"]) == (trained_on, start_model,
                                                                                            4, 2)
        assert lift["lift"] == pytest.approx(lift["end"] - lift["start"])
        assert stages["eval"]["metrics"][f"{name}_lift"] == pytest.approx(lift["lift"])
        for key in ("start", "end", "lift"):
            lo, hi = lift[f"{key}_ci"]
            assert lo <= lift[key] + 1e-12 and lift[key] <= hi + 1e-12
    r1_start = report["eval"]["sft"]["arithmetic"]
    assert report["rl_task_lift"]["r1"]["start"] == pytest.approx(r1_start["pass@1"])

    md = (out / "report.md").read_text()
    assert "## RL lift on the trained task" in md and "| r1 | arithmetic level 1 | 4 × 2 | sft |" in md
    assert {"pass_at_1.png", "rl_lift.png", "loss.png", "reward.png", "expert_load_pretrain.png"} <= {
        Path(p).name for p in report["plots"]}
    for plot in report["plots"]:
        assert f"]({plot})" in md
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sft_steps = stages["sft"]["metrics"]["steps"]
    assert f"| sft | {stages['sft']['wall_seconds']:.1f} | {stages['sft']['checkpoint']} | " \
           f"conversations {stages['sft']['metrics']['conversations']}, steps {sft_steps}," in md


def test_each_model_is_evaluated_in_its_training_template(run):
    out, _ = run
    for model, template in TEMPLATES.items():
        assert json.loads((out / "eval" / model / "results.json").read_text())["template"] == template


def test_later_stages_read_only_the_run_directory(run):
    """The run is self-contained: SFT, rejection and distillation data come from OUT, not ~/.cache."""
    out, _ = run

    def meta(stage):
        stage_json = json.loads((out / stage / "stage.json").read_text())
        return json.loads((out / stage_json["checkpoint"] / "nanoseek.json").read_text())

    assert meta("sft")["recipe"]["sft_cold"]["data"] == [str(out / "data" / "sets" / "sft.jsonl")]
    assert meta("distill")["recipe"]["distill_sft"]["data"] == [str(out / "rejection" / "sft.jsonl")]
    rejection = json.loads((out / "rejection" / "rejection.json").read_text())
    assert rejection["config"]["instruct_data"] == str(out / "data" / "sets" / "sft.jsonl")
    assert rejection["instruct_added"] > 0


def test_every_training_set_of_the_run_passed_curation(run):
    """The SFT and RL sets and the rejection samples (distillation's data) went through curation, each with its
    own manifest and data card, every input record accounted for, and the stages read what it kept."""
    out, _ = run
    for curated, kept_file in ((out / "data" / "sets" / "sft", out / "data" / "sets" / "sft.jsonl"),
                               (out / "data" / "sets" / "rl", out / "data" / "sets" / "rl.jsonl"),
                               (out / "rejection" / "curated", out / "rejection" / "sft.jsonl")):
        totals = json.loads((curated / "manifest.json").read_text())["totals"]
        assert totals["records"] == totals["kept"] + totals["removed"] + totals["rejected"] > 0
        assert totals["rejected"] == 0
        assert (curated / "data_card.md").exists()
        records = [json.loads(line) for line in kept_file.open()]
        assert len(records) == totals["kept"] > 0
    sft_records = [json.loads(line) for line in (out / "data" / "sets" / "sft.jsonl").open()]
    assert all("messages" in r and r["style"] in ("reasoning", "instruct") for r in sft_records)
    rl_records = [json.loads(line) for line in (out / "data" / "sets" / "rl.jsonl").open()]
    assert all({"question", "answer", "task", "difficulty", "prompt"} <= set(r) for r in rl_records)
    rejection = json.loads((out / "rejection" / "rejection.json").read_text())
    assert rejection["written"] == rejection["curation"]["kept"]
    assert rejection["curation"]["records"] == len((out / "rejection" / "samples.jsonl").read_text().splitlines())


def test_rerun_skips_every_finished_stage(run, capsys):
    out, _ = run
    before = {name: (out / name / "stage.json").stat().st_mtime_ns for name in STAGE_NAMES}
    capsys.readouterr()
    start = time.perf_counter()
    assert cli(["run", "--recipe", "debug", "--out", str(out), "--no-progress"]) == 0
    assert time.perf_counter() - start < 20
    printed = capsys.readouterr().out
    assert all(f"[{name}] already done" in printed for name in STAGE_NAMES)
    assert f"nanoseek chat --model {out / 'r1'}" in printed
    assert "r1 on its RL task (arithmetic level 1, 4 held-out problems × 2 samples): pass@1 " in printed
    assert "points, 95% interval [" in printed
    assert before == {name: (out / name / "stage.json").stat().st_mtime_ns for name in STAGE_NAMES}


def test_interrupted_stages_resume(run):
    """A stage directory without stage.json was interrupted: distillation resumes from its checkpoint (a fresh
    start would refuse the occupied directory), evaluation redoes only the model whose results are missing."""
    out, _ = run
    checkpoint = json.loads((out / "distill" / "stage.json").read_text())["checkpoint"]
    for marker in ("distill/stage.json", "eval/student/results.json", "eval/rl/student_rl/start/results.json",
                   "eval/stage.json", "report/stage.json"):
        (out / marker).unlink()
    base_results = (out / "eval" / "base" / "results.json").stat().st_mtime_ns
    stages = run_pipeline(load_recipe("debug"), out, progress=False)
    assert [s["name"] for s in stages] == STAGE_NAMES
    assert stages[STAGE_NAMES.index("distill")]["checkpoint"] == checkpoint
    assert (out / "eval" / "student" / "results.json").exists()
    assert (out / "eval" / "rl" / "student_rl" / "start" / "results.json").exists()
    assert (out / "eval" / "base" / "results.json").stat().st_mtime_ns == base_results


# --- recipe checks (fast) -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["debug", "tiny"])
def test_run_recipes_have_every_table(name):
    check_recipe(load_recipe(name))


def test_missing_table_and_bad_fields_fail_before_training():
    recipe = load_recipe("debug")
    with pytest.raises(ValueError, match=r"no \['eval'\] table"):
        check_recipe({k: v for k, v in recipe.items() if k != "eval"})
    with pytest.raises(ValueError, match="arithmetc"):
        check_recipe({**recipe, "eval": {**recipe["eval"], "tasks": ["arithmetc"]}})
    with pytest.raises(ValueError, match=r"\[grpo_r1\] .*template='r1'"):
        check_recipe({**recipe, "grpo_r1": {**recipe["grpo_r1"], "template": "r1"}})
    with pytest.raises(ValueError, match=r"\[run\] unknown field"):
        check_recipe({**recipe, "run": {"thread": 1}})
    with pytest.raises(ValueError, match="student_preset"):
        check_recipe({**recipe, "distill": {}})
    # an RL stage's lift needs rl_n held-out problems of what it trains on: too few fails now, not after training
    with pytest.raises(ValueError, match=r"\[eval\] rl_n = 100000: arithmetic: only \d+ unique eval problems"):
        check_recipe({**recipe, "eval": {**recipe["eval"], "rl_n": 100000}})


def test_run_seed_reaches_every_seeded_table():
    from nanoseek.pipeline import SEEDED_TABLES, with_seed

    recipe = with_seed(load_recipe("tiny", ["run.seed=7"]))
    assert all(recipe[t]["seed"] == 7 for t in SEEDED_TABLES)
    assert with_seed(load_recipe("tiny")) == load_recipe("tiny")  # no run seed: the recipe as written
    check_recipe(recipe)


def test_a_child_recipe_table_replaces_its_bases_whole(tmp_path):
    """A child of tiny that writes [sft_cold] gets exactly the fields it wrote there (tiny's max_steps, lr, ... do
    not leak in) and inherits the tables it does not write."""
    child = tmp_path / "child.toml"
    child.write_text('base = "tiny"\n[sft_cold]\nepochs = 3.0\n')
    tiny, merged = load_recipe("tiny"), load_recipe(str(child))
    assert "max_steps" in tiny["sft_cold"] and merged["sft_cold"] == {"epochs": 3.0}
    assert merged["pretrain"] == tiny["pretrain"] and merged["name"] == "child"
    children = [p.stem for p in RECIPE_DIR.glob("*.toml") if tomllib.loads(p.read_text()).get("base") == "tiny"]
    assert {"r1", "r1-zero", "distill", "dpo"} <= set(children)
    for name in children:  # every built-in child's tables are its own
        own = tomllib.loads((RECIPE_DIR / f"{name}.toml").read_text())
        assert all(load_recipe(name)[t] == v for t, v in own.items() if isinstance(v, dict))


def test_learning_study_measures_a_lever_per_step_with_error_classes(run, tmp_path):
    """bench/learning_study.py on the debug run: an RL stage retrained with a table field changed (--set, --tag),
    checkpoints at step marks, each scored with the paired lift and the arithmetic error classes."""
    out, _ = run
    study = tmp_path / "study"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_study.py"), "--run", str(out), "--out",
                           str(study), "--parts", "rl", "--stages", "r1_zero", "--rl-steps", "1,2", "--set",
                           "beta=0.04", "--tag", "kl"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((study / "study.json").read_text())["rl"]["r1_zero_kl"]
    assert [r["steps"] for r in rows] == [0, 1, 2]
    assert all(r["set"] == {"beta": 0.04} for r in rows)
    recipe = json.loads((study / "rl_r1_zero_kl" / "checkpoints" / "step_0000002" / "nanoseek.json").read_text())
    assert recipe["recipe"]["grpo_zero"]["beta"] == 0.04
    for r in rows:
        assert sum(r["errors"].values()) == pytest.approx(1.0) and r["errors"]["correct"] == pytest.approx(r["end"])
    assert "copy errors" in proc.stdout
    for r in rows:  # a kind of fact no sample wrote has no rate (and the JSON stays valid)
        assert set(r["fact_errors"]) == {"digit +", "digit -", "teen +", "teen -"}
        assert all(v is None or 0 <= v <= 1 for v in r["fact_errors"].values())
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_study.py"), "--run", str(out), "--out",
                          str(study), "--parts", "rl", "--set", "beta=0.04"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--tag" in bad.stderr
    typo = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_study.py"), "--run", str(out), "--out",
                           str(study), "--parts", "rl", "--set", "betta=0.04", "--tag", "x"], capture_output=True,
                          text=True)
    assert typo.returncode == 2 and "betta" in typo.stderr and "Traceback" not in typo.stderr


def test_learning_study_probes_the_facts_of_the_base_and_the_sft_model(run, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from learning_study import FACT_KINDS, level2_facts

    facts = level2_facts()  # digit +: 10 x 10, digit -: 55, teen +: 9 x 10, teen -: 9 x 10
    assert len(facts) == len(set(facts)) == 100 + 55 + 90 + 90
    assert all(0 <= (a + b if op == "+" else a - b) <= 27 and b <= 9 for a, op, b in facts)
    out, _ = run
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_study.py"), "--run", str(out), "--out",
                           str(tmp_path), "--parts", "facts"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rates = json.loads((tmp_path / "study.json").read_text())["facts"]
    assert set(rates) == {"pretrain", "sft"}
    assert all(set(r) == set(FACT_KINDS) and all(0 <= v <= 1 for v in r.values()) for r in rates.values())
    assert "| pretrain |" in proc.stdout


def test_arithmetic_errors_classifies_the_worked_steps(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from learning_study import arithmetic_errors

    rows = [("<think>\n8 - 5 + 6 = 3 + 6 = 9\n</think>", True),   # correct
            ("<think>\n8 - 8 + 6 = 0 + 6 = 6\n</think>", False),  # true facts, an operand copied wrong
            ("<think>\n8 - 5 + 6 = 2 + 6 = 8\n</think>", False),  # first fact wrong
            ("<think>\n8 - 5 = 3\n3 + 6 = 8\n</think>", False),  # second fact wrong (a line per step reads too)
            ("<think>\n8 - 5 = 3\n4 + 6 = 10\n</think>", False),  # the second step does not carry the first
            ("<answer>9</answer>", False)]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"task": "arithmetic", "completion": c, "correct": ok}) + "\n"
                            for c, ok in rows) + json.dumps({"task": "logic", "completion": "", "correct": False}))
    assert arithmetic_errors(path) == dict.fromkeys(("correct", "copy", "fact1", "fact2", "carry", "other"), 1 / 6)


def test_fact_errors_rates_each_kind_of_fact(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from learning_study import fact_errors

    rows = ["<think>\n8 + 5 = 13\n13 + 6 = 18\n</think>",  # digit + right, teen + wrong
            "<think>\n8 + 5 = 13\n13 - 6 = 7\n</think>",   # digit + right, teen - right
            "<think>\n8 - 5 = 2\n2 + 6 = 8\n</think>",     # digit - wrong, digit + right
            "<think>\n9 + 9 = 18\n18 + 1 = 19\n8 + 8 = 1\n</think>"]  # only the first two steps count
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"task": "arithmetic", "completion": c, "correct": False}) + "\n"
                            for c in rows))
    assert fact_errors(path) == {"digit +": 0.0, "digit -": 1.0, "teen +": 0.5, "teen -": 0.0}


def test_operand_errors_compares_the_worked_steps_with_the_question(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from learning_study import operand_errors

    rows = [("What is 8 - 5 + 6?", "<think>\n8 - 5 = 3\n3 + 6 = 9\n</think>"),   # all copied
            ("Work out 8 - 5 + 6.", "<think>\n8 - 8 + 6 = 0 + 6 = 6\n</think>"),  # b copied wrong
            ("8 - 5 + 6 = ?", "<think>\n8 + 5 = 13\n13 - 5 = 8\n</think>"),      # op1, op2 and c wrong
            ("8 - 5 + 6 = ?", "<answer>9</answer>")]                             # no steps: not counted
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"task": "arithmetic", "question": q, "completion": c}) + "\n"
                            for q, c in rows))
    assert operand_errors(path) == {"a": 0.0, "op1": 1 / 3, "b": 1 / 3, "op2": 1 / 3, "c": 1 / 3}
    path.write_text(json.dumps({"task": "arithmetic", "completion": rows[0][1]}))  # samples without questions
    assert operand_errors(path) is None
