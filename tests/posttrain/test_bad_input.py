"""Bad input to the post-training stages: every malformed record stops the run with an error naming its file
and line (or, with skip_invalid, is skipped, counted and reported), and over-long records are skipped and
counted, never lost silently. Covers sft, dpo, reward-model and grpo data loading."""

import json

import pytest

from nanoseek.common import read_jsonl
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.posttrain.dpo import dpo
from nanoseek.posttrain.grpo import GRPOConfig, GRPOStage, prompt_stream
from nanoseek.posttrain.preferences import load_pairs
from nanoseek.posttrain.reward_model import train_reward_model
from nanoseek.posttrain.sft import load_examples, sft
from nanoseek.train.metrics import read_metrics

GOOD = "<think>\n2 + 2 = 4\n</think>\n<answer>\n4\n</answer>"
BAD = "<think>\n2 + 2 = 5\n</think>\n<answer>\n5\n</answer>"
PAIR = {"prompt": "What is 2 + 2?", "chosen": GOOD, "rejected": BAD}


def conv(*turns):
    """A conversation from (role, content) pairs."""
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


OK_CONV = conv(("user", "What is 2 + 2?"), ("assistant", "4"))


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok(policy_dir):
    return Tokenizer.load(policy_dir)


# --- the JSONL reader every stage uses -------------------------------------------------------------------------

def test_reader_names_the_line_of_broken_json_non_objects_and_bad_bytes(tmp_path):
    path = write(tmp_path / "a.jsonl", [OK_CONV, "", "{not json"])
    with pytest.raises(ValueError, match=f"{path}:3: not valid JSON"):
        list(read_jsonl(path))
    path = write(tmp_path / "b.jsonl", [OK_CONV, "[1, 2]"])
    with pytest.raises(ValueError, match=f"{path}:2: expected a JSON object, got list"):
        list(read_jsonl(path))
    path = tmp_path / "c.jsonl"
    path.write_bytes(json.dumps(OK_CONV).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=f"{path}:2: not valid UTF-8"):
        list(read_jsonl(path))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(read_jsonl(tmp_path / "missing.jsonl"))


def test_reader_accepts_a_byte_order_mark_and_blank_lines(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(OK_CONV).encode() + b"\n\n  \n" + json.dumps(PAIR).encode() + b"\n")
    assert [line for line, _ in read_jsonl(path)] == [1, 4]


# --- conversations (sft), and the same checks on preference prompts ---------------------------------------------

MALFORMED_CONVERSATIONS = [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "a"}]}, "message 0 must be an object"),
    (conv(("robot", "hi"), ("assistant", "a")), "message 0 has unknown role 'robot'"),
    (conv(("user", ""), ("assistant", "a")), "message 0 \\(user\\) has empty or missing content"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "empty or missing content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                   {"role": "assistant", "content": "a"}]}, "content must be a string, got list"),
    (conv(("user", "q"), ("assistant", "a"), ("system", "be brief")), "message 2 is 'system'; a system message"),
    (conv(("assistant", "a"), ("user", "q")), "message 0 is 'assistant', expected 'user'"),
    (conv(("user", "q"), ("user", "q"), ("assistant", "a")), "message 1 is 'user', expected 'assistant'"),
    (conv(("user", "q"), ("assistant", "a"), ("user", "and?")), "must end with an assistant message"),
    (conv(("user", "hi<|eos|><|assistant|>4"), ("assistant", "a")), "contains the control token '<\\|eos\\|>'"),
    (conv(("user", "q"), ("assistant", "4<|user|>thanks")), "contains the control token '<\\|user\\|>'"),
]


@pytest.mark.parametrize(("record", "message"), MALFORMED_CONVERSATIONS)
def test_malformed_conversation_names_file_and_line_or_is_counted(tok, tmp_path, record, message):
    path = write(tmp_path / "sft.jsonl", [OK_CONV, OK_CONV, record])
    with pytest.raises(ValueError, match=message) as err:
        load_examples([path], tok, 512, skip_invalid=False)
    assert str(err.value).startswith(f"{path}:3: ")
    examples, skipped = load_examples([path], tok, 512, skip_invalid=True)
    assert len(examples) == 2 and skipped == {"invalid": 1, "too_long": 0}


@pytest.mark.parametrize(("prompt", "chosen", "message"), [
    ([{"content": "hi"}], GOOD, "message 0 must be an object"),
    ([{"role": "robot", "content": "hi"}], GOOD, "message 0 has unknown role 'robot'"),
    ([{"role": "user", "content": " "}], GOOD, "message 0 \\(user\\) has empty or missing content"),
    ([{"role": "user", "content": ["hi"]}], GOOD, "content must be a string, got list"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], GOOD,
     "message 0 is 'assistant', expected 'user'"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], GOOD,
     "message 1 is 'user', expected 'assistant'"),
    ([{"role": "user", "content": "q<|eos|>"}], GOOD, "contains the control token '<\\|eos\\|>'"),
    ("q", "4<|user|>thanks", "message 1 \\(assistant\\) contains the control token '<\\|user\\|>'"),
])
def test_malformed_preference_turns_name_file_and_line(tok, tmp_path, prompt, chosen, message):
    path = write(tmp_path / "pairs.jsonl", [PAIR, {"prompt": prompt, "chosen": chosen, "rejected": BAD}])
    with pytest.raises(ValueError, match=message) as err:
        load_pairs(path, tok, 512)
    assert str(err.value).startswith(f"{path}:2: ")


@pytest.mark.parametrize(("record", "message"), [
    ({"chosen": GOOD, "rejected": BAD}, "missing \\['prompt'\\]"),
    ({"prompt": "q", "rejected": BAD}, "missing \\['chosen'\\]"),
    ({"prompt": "q"}, "missing \\['chosen', 'rejected'\\]"),
    ({"prompt": "q", "chosen": GOOD, "rejected": None}, "'rejected' must be a non-empty string"),
    ({"prompt": "q", "chosen": {"content": GOOD}, "rejected": BAD}, "'chosen' must be a non-empty string"),
    ({"prompt": "q", "chosen": "  ", "rejected": BAD}, "'chosen' must be a non-empty string"),
    ({"prompt": None, "chosen": GOOD, "rejected": BAD}, "'prompt' must be a string or a non-empty list"),
    ({"prompt": [], "chosen": GOOD, "rejected": BAD}, "'prompt' must be a string or a non-empty list"),
    ({"prompt": "", "chosen": GOOD, "rejected": BAD}, "message 0 \\(user\\) has empty"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "4"}], "chosen": GOOD,
      "rejected": BAD}, "'prompt' must end with a user message"),
    ({"prompt": "q", "chosen": GOOD, "rejected": GOOD}, "'chosen' and 'rejected' are the same reply"),
])
def test_preference_record_missing_or_bad_side_names_file_and_line_or_is_counted(tok, tmp_path, record, message):
    path = write(tmp_path / "pairs.jsonl", [PAIR, record, PAIR])
    with pytest.raises(ValueError, match=message) as err:
        load_pairs(path, tok, 512)
    assert str(err.value).startswith(f"{path}:2: ")
    pairs, skipped = load_pairs(path, tok, 512, skip_invalid=True)
    assert len(pairs) == 2 and skipped == {"invalid": 1, "too_long": 0}


def test_over_long_records_are_skipped_and_counted_not_errors(tok, tmp_path):
    long_question = "What is " + " + ".join(["1"] * 200) + "?"
    path = write(tmp_path / "sft.jsonl", [OK_CONV, conv(("user", long_question), ("assistant", "200"))])
    examples, skipped = load_examples([path], tok, 64, skip_invalid=False)
    assert len(examples) == 1 and skipped == {"invalid": 0, "too_long": 1}
    path = write(tmp_path / "pairs.jsonl", [PAIR, {**PAIR, "prompt": long_question}])  # the prompt alone is over
    pairs, skipped = load_pairs(path, tok, 64)
    assert len(pairs) == 1 and skipped == {"invalid": 0, "too_long": 1}


# --- the stages: errors before any training, skips reported -------------------------------------------------

def test_sft_reports_skips_and_says_why_nothing_is_left(policy_dir, tmp_path, capsys):
    long_conv = conv(("user", "What is " + " + ".join(["1"] * 200) + "?"), ("assistant", "200"))
    bad = conv(("user", "q"), ("user", "q"), ("assistant", "a"))
    recipe = {"sft": {"seq_len": 64, "batch_size": 2, "max_steps": 1, "device": "cpu", "val_fraction": 0.0}}
    data = write(tmp_path / "bad.jsonl", [OK_CONV, bad])
    with pytest.raises(ValueError, match=f"{data}:2: message 1 is 'user'"):
        sft(recipe, tmp_path / "a", init=policy_dir, data=[data], progress=False)
    data = write(tmp_path / "long.jsonl", [long_conv, long_conv])
    with pytest.raises(ValueError, match="no usable training conversations .*skipped 0 invalid and 2 over-long"):
        sft(recipe, tmp_path / "b", init=policy_dir, data=[data], progress=False)
    data = write(tmp_path / "mixed.jsonl", [OK_CONV, bad, long_conv, OK_CONV])
    skip = {"sft": {**recipe["sft"], "skip_invalid": True}}
    sft(skip, tmp_path / "c", init=policy_dir, data=[data], progress=False)
    assert "sft: skipped 1 invalid and 1 over-long (> 65 tokens) conversations" in capsys.readouterr().err
    event = read_metrics(tmp_path / "c" / "metrics.jsonl")[0]
    assert event["skipped"] == {"invalid": 1, "too_long": 1} and event["train_conversations"] == 2


def test_dpo_and_reward_model_stop_at_a_bad_pair_and_report_skips(policy_dir, tmp_path):
    data = write(tmp_path / "pairs.jsonl", [PAIR, {"prompt": "q", "chosen": GOOD}])
    with pytest.raises(ValueError, match=f"{data}:2: missing \\['rejected'\\]"):
        dpo({"dpo": {"device": "cpu"}}, tmp_path / "dpo", init=policy_dir, data=data, progress=False)
    with pytest.raises(ValueError, match=f"{data}:2: missing \\['rejected'\\]"):
        train_reward_model({"reward_model": {"device": "cpu"}}, tmp_path / "rm", init=policy_dir, data=data,
                           progress=False)
    recipe = {"reward_model": {"device": "cpu", "skip_invalid": True, "max_tokens": 8}}  # every pair is over 8
    with pytest.raises(ValueError, match="no usable preference pairs .*skipped 1 invalid and 1 over-long"):
        train_reward_model(recipe, tmp_path / "rm2", init=policy_dir, data=data, progress=False)
    recipe = {"dpo": {"device": "cpu", "skip_invalid": True, "max_steps": 1, "batch_size": 1, "val_fraction": 0}}
    dpo(recipe, tmp_path / "dpo2", init=policy_dir, data=data, progress=False)
    event = read_metrics(tmp_path / "dpo2" / "metrics.jsonl")[0]
    assert event["skipped"] == {"invalid": 1, "too_long": 0} and event["train_pairs"] == 1


# --- grpo prompts ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("record", "message"), [
    ({"answer": "4"}, "needs a non-empty 'question'"),
    ({"question": "  ", "answer": "4"}, "needs a non-empty 'question'"),
    ({"question": "What is 2 + 2?"}, "needs a non-empty 'answer' string"),
    ({"question": "What is 2 + 2?", "answer": 4}, "needs a non-empty 'answer' string"),
])
def test_grpo_prompt_records_name_file_and_line(tok, tmp_path, record, message):
    path = write(tmp_path / "rl.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}, record])
    cfg = GRPOConfig(data=str(path))
    with pytest.raises(ValueError, match=message) as err:
        next(prompt_stream(cfg, tok, 0))
    assert str(err.value).startswith(f"{path}:2: ")


def test_grpo_refuses_a_prompt_over_max_prompt_tokens(policy_dir, tmp_path):
    path = write(tmp_path / "rl.jsonl", [{"question": "What is " + " + ".join(["1"] * 40) + "?", "answer": "40"}])
    cfg = GRPOConfig(data=str(path), max_prompt_tokens=32, prompts_per_step=1, num_generations=2, max_new_tokens=4,
                     rewards={"language": 1.0}, eval_problems=0, dynamic_sampling=False, device="cpu")
    with pytest.raises(ValueError, match="max_prompt_tokens=32"):
        GRPOStage.load(cfg, str(policy_dir), tmp_path / "run").rollout()
