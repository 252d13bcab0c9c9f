"""`nanoseek r1`: the five stages run in order through the stage runner `nanoseek run` uses, each once; a rerun
skips finished stages and an interrupted one resumes (the stages themselves are replaced by recorders)."""

from pathlib import Path

from nanoseek.posttrain import r1 as r1_module


def recorder(kind: str, calls: list):
    def stage(recipe, out, init=None, data=None, resume=False, progress=True, section=None):
        out = Path(out)
        calls.append((kind, section, out.name, resume, Path(init).name, [Path(d).name for d in data or []]))
        if kind == "rejection":
            out.mkdir(parents=True, exist_ok=True)
            (out / "sft.jsonl").write_text("{}\n")
            return out / "sft.jsonl"
        ckpt = out / "checkpoints" / "step_0000001"
        ckpt.mkdir(parents=True, exist_ok=True)
        return ckpt
    return stage


def test_r1_runs_each_stage_once_and_resumes_the_interrupted_one(tmp_path, monkeypatch, policy_dir):
    calls = []
    for kind in ("sft", "grpo", "rejection"):
        monkeypatch.setattr(r1_module, kind, recorder(kind, calls))
    out = tmp_path / "r1"
    final = r1_module.r1({}, out, policy_dir, progress=False)
    assert final == out / "5-final-rl" / "checkpoints" / "step_0000001"
    assert calls == [
        ("sft", "sft_cold", "1-cold-start", False, policy_dir.name, []),
        ("grpo", "grpo_reasoning", "2-reasoning-rl", False, "step_0000001", []),
        ("rejection", None, "3-rejection", False, "step_0000001", []),
        ("sft", "sft", "4-sft", False, policy_dir.name, ["sft.jsonl"]),  # R1 fine-tunes the base again
        ("grpo", "grpo_final", "5-final-rl", False, "step_0000001", [])]
    assert all((out / s / "stage.json").exists() for s in r1_module.STAGES)

    calls.clear()
    assert r1_module.r1({}, out, policy_dir, progress=False) == final and calls == []  # all finished

    (out / "5-final-rl" / "stage.json").unlink()  # killed before it finished: its directory is left
    assert r1_module.r1({}, out, policy_dir, progress=False) == final
    assert calls == [("grpo", "grpo_final", "5-final-rl", True, "step_0000001", [])]
