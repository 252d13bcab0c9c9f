"""Each post-training stage is a `nanoseek <stage>` command: add_arguments + main, run here through argparse."""

import argparse
import importlib
import json

import pytest

from nanoseek.train.metrics import read_metrics

MODULES = ["sft", "dpo", "reward_model", "grpo", "distill", "rejection", "r1"]


@pytest.mark.parametrize("name", MODULES)
def test_stage_parses_its_arguments(name):
    mod = importlib.import_module(f"nanoseek.posttrain.{name}")
    parser = argparse.ArgumentParser()
    mod.add_arguments(parser)
    start = ["--teacher", "y", "--student", "z"] if name == "distill" else ["--init", "y"]
    args = parser.parse_args(["--recipe", "r1", "--out", "x", *start, "--set", "a.b=1"])
    assert str(args.out) == "x" and args.set == ["a.b=1"] and callable(mod.main)


def test_sft_command_runs_a_recipe_file(policy_dir, tmp_path, capsys):
    from nanoseek.posttrain import sft

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]}) + "\n")
    recipe = tmp_path / "mine.toml"
    recipe.write_text('[sft]\nmax_steps = 2\nseq_len = 32\nbatch_size = 1\nval_fraction = 0.0\ndevice = "cpu"\n')
    parser = argparse.ArgumentParser()
    sft.add_arguments(parser)
    args = parser.parse_args(["--recipe", str(recipe), "--out", str(tmp_path / "run"), "--init", str(policy_dir),
                              "--data", str(data), "--set", "sft.lr=1e-3", "--no-progress"])
    assert sft.main(args) == 0
    assert "final checkpoint" in capsys.readouterr().out
    assert [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r][0] <= 1e-3
