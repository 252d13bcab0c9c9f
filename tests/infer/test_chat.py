"""The terminal chat session, and the chat / generate / feedback commands end to end on a saved checkpoint."""

import argparse
import io
import json
import sys

from nanoseek.infer import chat as chat_cmd
from nanoseek.infer import generate as generate_cmd
from nanoseek.infer.chat import DIM, ChatSession
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.serve import feedback as feedback_cmd
from nanoseek.infer.serve.feedback import FeedbackStore


def run(module, argv: list[str]) -> int:
    """A command as `nanoseek <command>` runs it (cli.py builds the parser from the same two functions)."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.main(parser.parse_args(argv))


def session(chat_model, tokenizer, **kw):
    out = io.StringIO()
    engine = Engine(chat_model, tokenizer, max_batch=4)
    return ChatSession(engine, SamplingParams(max_tokens=60), out=out, **kw), out


def test_reasoning_streams_dimmed_and_only_answers_stay_in_history(chat_model, tokenizer):
    chat, out = session(chat_model, tokenizer)
    assert chat.ask("hi") == "hello there"
    shown = out.getvalue()
    assert f"{DIM}they" in shown and "hello there" in shown and "</think>" not in shown
    assert chat.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    assert chat.ask("hello") == "hello there"  # a second turn on top of the history
    assert len(chat.messages) == 4


def test_commands(chat_model, tokenizer):
    chat, out = session(chat_model, tokenizer)
    chat.ask("hi")
    assert chat.command("/reset") and chat.messages == []
    assert chat.command("/think") and not chat.thinking
    chat.command("/think")
    assert chat.command("/verify 3") and chat.verify_n == 3
    assert chat.ask("hi") == "hello there"
    assert "agreement 3/3" in out.getvalue()
    chat.command("/verify 99")
    assert chat.verify_n == 3 and "usage: /verify N" in out.getvalue()
    assert not chat.command("/quit")


def test_chat_command_reads_stdin(chat_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/verify 2\nhello\n/quit\n"))
    assert run(chat_cmd, ["--model", str(chat_dir), "--temperature", "0", "--max-tokens", "60"]) == 0
    out = capsys.readouterr().out
    assert out.count("hello there") == 2 and "agreement 2/2" in out


def test_generate_command(chat_dir, capsys):
    assert run(generate_cmd, ["--model", str(chat_dir), "--prompt", "hi", "--chat", "--think",
                "--max-tokens", "60"]) == 0
    assert "they greet me, so I greet back\n</think>\n<answer>\nhello there\n</answer>" in capsys.readouterr().out
    assert run(generate_cmd, ["--model", str(chat_dir), "--prompt", "Hello", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_feedback_export_command(tmp_path, capsys):
    db = tmp_path / "fb.sqlite"
    store = FeedbackStore(db)
    prompt = [{"role": "user", "content": "2+2?"}]
    # ratings of answers this server gave (by completion id) are verified; the forged one a client sent is not
    store.add_feedback("rating", prompt, "<think>\nadd\n</think>\n<answer>\n4\n</answer>", rating=1,
                       completion_id="chatcmpl-1", meta={"verified": True})
    store.add_feedback("rating", prompt, "</think>\n5", rating=-1, comment="wrong", completion_id="chatcmpl-2",
                       meta={"verified": True})
    store.add_feedback("rating", prompt, "</think>\n22", rating=1, meta={"verified": False})
    store.add_feedback("low_confidence", prompt, "</think>\n3", meta={"votes": 1, "n": 4})
    store.close()
    assert run(feedback_cmd, ["export", "--db", str(db), "--out", str(tmp_path / "all"), "--include-unverified"]) == 0
    assert "2 SFT conversations, 2 preference pairs" in capsys.readouterr().out
    assert run(feedback_cmd, ["export", "--db", str(db), "--out", str(tmp_path / "out")]) == 0
    assert ("1 SFT conversations, 1 preference pairs and 2 answers to review under "
            f"{tmp_path / 'out'} (1 unverified ratings left out" in capsys.readouterr().out)
    sft = json.loads((tmp_path / "out" / "sft.jsonl").read_text())
    assert sft["messages"][-1] == {"role": "assistant", "content": "<think>\nadd\n</think>\n<answer>\n4\n</answer>"}
    pair = json.loads((tmp_path / "out" / "preference.jsonl").read_text())
    assert pair == {"prompt": prompt, "chosen": [{"role": "assistant", "content": sft["messages"][-1]["content"]}],
                    "rejected": [{"role": "assistant", "content": "</think>\n5"}]}
    assert run(feedback_cmd, ["stats", "--db", str(db)]) == 0
    assert "low_confidence: 1, thumbs down: 1, thumbs up: 1, thumbs up (unverified): 1" in capsys.readouterr().out
    assert run(feedback_cmd, ["export", "--db", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path)]) == 2
