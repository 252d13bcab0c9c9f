"""Command-line faults (issue 13): a user's mistake -- a bad path, config, checkpoint or value, a full disk -- ends
pretrain / generate / chat / serve / eval with one line `nanoseek <command>: error: ...` and exit status 2, while a
bug keeps its traceback (and NANOSEEK_DEBUG=1 shows the traceback of user errors too)."""

import builtins
import json

import pytest
import torch
from safetensors import SafetensorError

import nanoseek.model.hf as hf
from nanoseek.cli import main as cli
from nanoseek.config import load_recipe
from nanoseek.data.builtin import DataConfig, cached
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.model import Transformer, preset

TEXTS = ["Hello there, how are you today? Fine thanks, and you?", "The answer is 42. What is 2 + 2? It is 4."] * 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A debug model with its tokenizer and a 64-token context."""
    path = tmp_path_factory.mktemp("model")
    tok = train_tokenizer(TEXTS, 300, path)
    torch.manual_seed(0)
    Transformer(preset("debug", vocab_size=tok.vocab_size, max_position_embeddings=64)).save_pretrained(path)
    return path


@pytest.fixture
def broken(model_dir, tmp_path):
    """A copy of the model whose file `name` gets `damage`."""
    def make(name, damage):
        path = tmp_path / "broken"
        path.mkdir()
        for f in model_dir.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
        damage(path / name)
        return path
    return make


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nanoseek {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"], ["serve", "--feedback-db", ""]],
                         ids=lambda c: c[0])
def test_a_missing_model_is_one_line(command, tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert cli([command[0], "--model", str(missing), *command[1:]]) == 2
    assert f"{missing}: no such checkpoint or run directory" in one_error_line(capsys, command[0])


def test_eval_reports_a_missing_model_in_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert cli(["eval", "--model", str(missing), "--tasks", "arithmetic"]) == 2
    assert f"{missing}: no such checkpoint" in one_error_line(capsys, "eval")


def test_a_missing_recipe_is_one_line(tmp_path, capsys):
    assert cli(["pretrain", "--recipe", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "run")]) == 2
    assert f"recipe '{tmp_path / 'nope.toml'}' not found" in one_error_line(capsys, "pretrain")


def test_a_truncated_checkpoint_is_one_line_naming_the_file(broken, capsys):
    path = broken("model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:100]))
    assert cli(["generate", "--model", str(path), "--prompt", "hi"]) == 2
    assert f"{path / 'model.safetensors'}: unreadable safetensors file" in one_error_line(capsys, "generate")


def test_a_bad_config_is_one_line_naming_file_and_field(broken, capsys):
    def damage(f):
        f.write_text(json.dumps({**json.loads(f.read_text()), "num_hidden_layers": "two"}))
    path = broken("config.json", damage)
    assert cli(["chat", "--model", str(path)]) == 2
    line = one_error_line(capsys, "chat")
    assert f"{path / 'config.json'}: " in line and "num_hidden_layers='two' must be an integer" in line


@pytest.mark.parametrize("args,reason", [(["--top-p", "2"], "top_p"), (["--max-tokens", "-1"], "max_tokens"),
                                         (["--prompt", "word " * 200], "the model's context is 64")])
def test_bad_generation_values_are_one_line(model_dir, args, reason, capsys):
    assert cli(["generate", "--model", str(model_dir), "--prompt", "hi", *args]) == 2
    assert reason in one_error_line(capsys, "generate")


def test_chat_survives_a_message_longer_than_the_context(model_dir, monkeypatch, capsys):
    lines = iter(["word " * 200, "hi", "/quit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert cli(["chat", "--model", str(model_dir), "--max-tokens", "4", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "error: prompt has" in out and next(lines, None) is None  # the chat went on to "hi" and "/quit"


def test_nanoseek_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        cli(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    import nanoseek.infer.generate

    def bug(args):
        raise RuntimeError("a bug, not a user error")
    monkeypatch.setattr(nanoseek.infer.generate, "main", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli(["generate", "--model", "any", "--prompt", "hi"])


def test_a_full_disk_during_pretraining_is_one_line_and_leaves_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    data = load_recipe("debug")["data"]
    cached(DataConfig(**data, root=str(tmp_path / "data")))
    saves = []
    real_save_file = hf.save_file

    def disk_fills_at_the_second_save(tensors, path, metadata=None):
        saves.append(path)
        if len(saves) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", disk_fills_at_the_second_save)
    run = tmp_path / "run"
    assert cli(["pretrain", "--recipe", "debug", "--out", str(run), "--max-steps", "3", "--save-every", "1",
                "--no-progress", "--set", f"data.root={tmp_path / 'data'}", "--set", "pretrain.plots=false",
                "--set", "pretrain.val_every=0"]) == 2
    line = one_error_line(capsys, "pretrain")
    assert f"no space left on device while saving {run / 'checkpoints' / 'step_0000002'}" in line
    assert f"the last complete one is {run / 'checkpoints' / 'step_0000001'}" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000001"]  # nothing partial


@pytest.mark.parametrize("flag", ["--expert-parallel", "--pipeline-parallel"])
def test_a_process_count_below_one_is_one_line(flag, tmp_path, capsys):
    assert cli(["pretrain", "--recipe", "debug", "--out", str(tmp_path), flag, "0"]) == 2
    assert capsys.readouterr().err.strip() == f"nanoseek pretrain: error: {flag} 0: expected a process count of " \
                                              f"at least 1"
    assert not any(tmp_path.iterdir())  # refused before anything was written
