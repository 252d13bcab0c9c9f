"""`nanoseek chat --image PATH` and `/image PATH` on a VL checkpoint: the answer is the VL model's own greedy answer
to the image, the image stays with its message in later turns, and a text-only model or a bad file is refused."""

import io
import sys

import torch
from PIL import Image

import nanoseek
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import chat as chat_cmd
from nanoseek.infer.chat import ChatSession
from nanoseek.infer.engine import Engine, load_engine
from nanoseek.infer.reasoning import split_reasoning
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.vision import to_pixels

from .test_chat import run

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def square(path):
    im = Image.new("RGB", (40, 40), (200, 30, 30))
    im.paste((20, 40, 220), (10, 10, 20, 20))
    im.save(path)
    return path


def test_image_message_answers_as_the_vl_model_and_stays_in_history(vl_dir, tmp_path):
    out = io.StringIO()
    chat = ChatSession(load_engine(vl_dir, max_batch=2), PARAMS, thinking=False, out=out, color=False)
    assert chat.command(f"/image {square(tmp_path / 'sq.png')}") and "image attached" in out.getvalue()
    answer = chat.ask("what colour is the square?")
    model, tok = nanoseek.load(vl_dir), Tokenizer.load(vl_dir)
    ids = tok.encode_chat([{"role": "user", "content": "<image>\nwhat colour is the square?"}], True, False,
                          image_tokens=model.vl_config.image_tokens)[0]
    pixels = to_pixels([Image.open(tmp_path / "sq.png")], model.vl_config.vision.image_size)
    expected = model.generate(torch.tensor([ids]), PARAMS.max_tokens, images=pixels)[0, len(ids):].tolist()
    assert answer == split_reasoning(tok.decode(expected), thinking=False)[1]
    assert chat.messages[0]["content"] == "<image>\nwhat colour is the square?" and not chat.attached
    chat.ask("and the background?")  # the second turn's prompt still holds the first image's placeholders
    assert len(chat.images) == 1 and len(chat.messages) == 4
    chat.command("/image " + str(tmp_path / "missing.png"))
    assert "error:" in out.getvalue() and not chat.attached
    chat.command("/reset")
    assert chat.images == [] and chat.messages == []


def test_text_only_model_refuses_images(chat_model, tokenizer, tmp_path):
    out = io.StringIO()
    chat = ChatSession(Engine(chat_model, tokenizer, max_batch=2), PARAMS, out=out, color=False)
    chat.command(f"/image {square(tmp_path / 'sq.png')}")
    assert "this model takes no images" in out.getvalue() and not chat.attached


def test_chat_command_with_image(vl_dir, chat_dir, tmp_path, monkeypatch, capsys):
    path = square(tmp_path / "sq.png")
    monkeypatch.setattr(sys, "stdin", io.StringIO("what colour?\n/quit\n"))
    assert run(chat_cmd, ["--model", str(vl_dir), "--image", str(path), "--temperature", "0", "--max-tokens", "4",
                          "--no-think", "--no-color"]) == 0
    assert "image attached to the next message (1)" in capsys.readouterr().out
    (tmp_path / "not.png").write_bytes(b"plain text")
    assert run(chat_cmd, ["--model", str(vl_dir), "--image", str(tmp_path / "not.png")]) == 2
    assert "--image" in capsys.readouterr().err
    assert run(chat_cmd, ["--model", str(chat_dir), "--image", str(path)]) == 2
    assert "takes no images" in capsys.readouterr().err
