"""The README's promise (issue 13): every command of its usage list works after its install command.

The commands are read from README.md itself -- the `nanoseek ...` lines of the first fenced block under
"## Using it" -- and run in that order in a fresh directory, so their relative paths (data/synth, runs/base, ...)
chain as a reader's would. Each line runs as written plus a few arguments that make it cheap (a debug-size model,
a small corpus, two training steps, two problems); `runs/nanoseek/r1` is the model the pretrain line made. The
one command too heavy for the default suite (`run`, the whole pipeline, which tests/test_pipeline.py runs on the
debug recipe) is parsed with its real parser; `serve` starts in a subprocess and answers /health. A command the
README gains that this file does not know fails the test, so the list and the test stay in step.
"""

import builtins
import contextlib
import io
import itertools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nanoseek.cli import build_parser
from nanoseek.cli import main as cli

REPO = Path(__file__).resolve().parents[2]


def usage_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block under "## Using it" in README.md."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Using it", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```([a-z]*)\n(.*?)```", section, re.S)


def usage_lines() -> list[str]:
    """The `nanoseek ...` lines of the first fenced block under "## Using it", comments removed."""
    block = usage_blocks()[0][1]
    return [" ".join(shlex.split(line, comments=True)) for line in block.splitlines() if line.startswith("nanoseek ")]


# the README command (its first words) -> arguments appended to make it cheap; argparse takes the last value
CHEAP = {
    "model-info": [],
    "data synth": ["--docs", "200", "--sft", "10", "--rl", "10", "--eval-per-level", "5"],
    "data curate": ["--workers", "1"],
    "data tokenizer": ["--vocab-size", "512"],
    "data tokenize": ["--workers", "1"],
    "pretrain": ["--max-steps", "2", "--no-progress", "--set", "model.preset=debug", "--set",
                 "data.tokenizer_dir=data/tok", "--set", "data.tokens_dir=data/tokens", "--set", "pretrain.plots=false",
                 "--set", "pretrain.val_batches=1"],
    "eval": ["--n", "2", "--k", "1", "--max-new-tokens", "8", "--no-progress"],
    "chat": ["--max-tokens", "8", "--no-color"],
}
PARSED_ONLY = {"run"}  # the whole pipeline: its arguments are parsed here, tests/test_pipeline.py runs it
SUBPROCESS = {"serve"}  # a server: started, asked /health, stopped


def command_of(line: str) -> str:
    words = shlex.split(line)[1:]
    return " ".join(words[:2]) if words[0] == "data" else words[0]


def write_my_corpus(path: Path) -> None:
    """The user corpus the curate line names: a few JSONL documents, zstd-compressed."""
    import zstandard

    lines = [json.dumps({"id": f"mine-{i}", "text": f"My own note number {i} is about gardens and rivers. " * 12})
             for i in range(5)]
    path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
    """Run every in-process README line in order in a fresh directory; (directory, {line: (status, output)})."""
    work = tmp_path_factory.mktemp("readme")
    write_my_corpus(work / "my_corpus.jsonl.zst")
    (work / "runs" / "nanoseek").mkdir(parents=True)
    (work / "runs" / "nanoseek" / "r1").symlink_to(work / "runs" / "base")  # the model the pretrain line makes
    chat_input = itertools.cycle(["hello", "/quit"])  # what a user types into each chat line
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.setattr(builtins, "input", lambda prompt="": next(chat_input))
        for line in usage_lines():
            command = command_of(line)
            if command not in CHEAP:
                continue
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                status = cli(shlex.split(line)[1:] + CHEAP[command])
            results[line] = (status, out.getvalue())
    return work, results


def test_the_server_needs_nothing_beyond_the_readme_install():
    """`pip install -e .` (the README's install command) brings what `nanoseek serve` imports."""
    from nanoseek.config import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=;\[ ]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    assert {"fastapi", "uvicorn"} <= names


def test_the_usage_list_is_found_and_every_command_is_covered():
    lines = usage_lines()
    assert len(lines) >= 10 and any(command_of(x) == "serve" for x in lines)
    uncovered = [x for x in lines if command_of(x) not in CHEAP.keys() | PARSED_ONLY | SUBPROCESS]
    assert not uncovered, f"README commands without a way to test them here (add them to CHEAP): {uncovered}"


@pytest.mark.parametrize("line", [x for x in usage_lines() if command_of(x) in CHEAP])
def test_a_usage_line_runs(walked, line):
    status, output = walked[1][line]
    assert status == 0, f"`{line}` exited with {status}:\n{output[-3000:]}"


@pytest.mark.parametrize("line", [x for x in usage_lines() if command_of(x) in PARSED_ONLY])
def test_a_heavy_usage_line_parses(line):
    argv = shlex.split(line)[1:]
    args = build_parser(argv[0]).parse_args(argv)
    assert callable(args.func)


def test_the_python_usage_runs(walked, monkeypatch):
    """The README's Python snippet, as written, on the model the pretrain line made (`input_ids`: a few tokens)."""
    import torch

    work, _ = walked
    monkeypatch.chdir(work)
    for language, code in usage_blocks():
        if language == "python":
            exec(code, {"input_ids": torch.tensor([[0, 5, 9, 12]])})
    assert (work / "export" / "config.json").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("line", [x for x in usage_lines() if command_of(x) in SUBPROCESS])
def test_the_server_line_starts_and_answers(walked, line):
    work, _ = walked
    port = free_port()
    argv = shlex.split(line)[1:] + ["--port", str(port), "--feedback-db", str(work / "feedback.sqlite")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "nanoseek", *argv], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/health"
    try:
        deadline = time.time() + 90
        while True:
            assert server.poll() is None, f"`{line}` exited with {server.returncode}:\n{server.stdout.read()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.time() < deadline, f"`{line}` did not answer {url} within 90 s"
                time.sleep(0.2)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_the_pretrain_line_runs_on_the_full_tiny_recipe(tmp_path, monkeypatch):
    """The README's pretrain line as written -- the tiny recipe, its built-in data built from scratch -- for one
    step (the default suite runs it on a debug model and the data the README's data lines made)."""
    line = next(x for x in usage_lines() if command_of(x) == "pretrain")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOSEEK_DATA", str(tmp_path / "data"))
    assert cli(shlex.split(line)[1:] + ["--max-steps", "1", "--no-progress", "--set", "pretrain.plots=false"]) == 0
