"""SFT: record validation, assistant-only labels, packing, style mixing, and a short run that learns."""

import json
import random

import pytest
import torch

import nanoseek
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.posttrain.sft import Example, load_examples, mixed_order, pack, sft
from nanoseek.train.metrics import read_metrics


def conv(q, a, system=None):
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + msgs}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(("record", "message"), [
    ({"messages": []}, "non-empty list"),
    ({"prompt": "x"}, "non-empty list"),
    ({"messages": [{"content": "hi"}]}, "'role'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}, "empty"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "expected 'user'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}, "expected 'assistant'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "end with an assistant"),
    ({**conv("q", "a"), "style": "poetry"}, "style 'poetry'"),
])
def test_malformed_records_name_file_and_line(policy_dir, tmp_path, record, message):
    tok = Tokenizer.load(policy_dir)
    path = write(tmp_path / "bad.jsonl", [conv("What is 2 + 2?", "4"), record])
    with pytest.raises(ValueError, match=message) as err:
        load_examples([path], tok, 512, skip_invalid=False)
    assert f"{path}:2" in str(err.value)
    examples, skipped = load_examples([path], tok, 512, skip_invalid=True)
    assert len(examples) == 1 and skipped == {"invalid": 1, "too_long": 0}


def test_labels_cover_assistant_tokens_only_and_packing_keeps_conversations_whole(policy_dir):
    tok = Tokenizer.load(policy_dir)
    a = Example(*tok.encode_chat(conv("What is 2 + 2?", "The answer is 4.")["messages"]), "instruct")
    b = Example(*tok.encode_chat(conv("Hello", "<think>\nhi\n</think>\n<answer>\nhello\n</answer>",
                                      system="Be brief.")["messages"]), "reasoning")
    row_len = len(a.ids) + len(b.ids) + 3
    tokens, labels = pack([a, b, a], row_len, tok.pad_id)
    assert tokens.shape == (2, row_len)  # a+b fit in a row, the second a starts a new one
    assert tokens[0, :len(a.ids)].tolist() == a.ids and tokens[1, :len(a.ids)].tolist() == a.ids
    trained = labels[0] != -100
    assert trained.sum() == sum(a.mask) + sum(b.mask)
    decoded = tok.decode(labels[0][trained].tolist())
    assert "The answer is 4." in decoded and "hello" in decoded
    assert "What is" not in decoded and "Be brief" not in decoded and "Hello" not in decoded
    assert labels[0][trained].tolist().count(tok.eos_id) == 2  # each assistant turn learns to stop


def test_mixed_order_follows_weights_and_repeats_a_small_style():
    examples = [Example([0], [0], "reasoning")] * 90 + [Example([1], [0], "instruct")] * 3
    drawn = mixed_order(examples, {"reasoning": 0.5, "instruct": 0.5}, 2000, random.Random(0))
    share = sum(e.style == "instruct" for e in drawn) / len(drawn)
    assert 0.45 < share < 0.55
    with pytest.raises(ValueError, match="styles"):
        mixed_order(examples[:5], {"instruct": 1.0}, 10, random.Random(0))


def test_sft_learns_a_conversation_and_resumes(policy_dir, tmp_path):
    reply = "<think>\n2 + 3 = 5\n</think>\n<answer>\n5\n</answer>"
    data = write(tmp_path / "sft.jsonl", [conv("What is 2 + 3?", reply), conv("Say hi.", "Hi!")] * 8)
    recipe = {"sft": {"seq_len": 64, "batch_size": 4, "max_steps": 12, "lr": 1e-2, "warmup_steps": 1,
                      "val_fraction": 0.2, "val_every": 6, "save_every": 6, "device": "cpu"}}
    out = tmp_path / "run"
    ckpt = sft(recipe, out, init=policy_dir, data=[data], progress=False)
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert "val_loss" in records[5] and "val_loss" in records[-1]
    meta = json.loads((ckpt / "nanoseek.json").read_text())
    assert meta["stage"] == "sft" and meta["step"] == 12 and (ckpt / "tokenizer.json").exists()
    model = nanoseek.load(ckpt)
    assert torch.isfinite(next(model.parameters())).all()
    with pytest.raises(FileExistsError):
        sft(recipe, out, init=policy_dir, data=[data], progress=False)
    recipe["sft"]["max_steps"] = 14
    ckpt = sft(recipe, out, init=policy_dir, data=[data], resume=True, progress=False)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 15)) and ckpt.name == "step_0000014"
