"""The verification loop: voting by value, agreement as confidence, "I'm not sure" below the threshold."""

import torch

from nanoseek.infer.engine import Engine
from nanoseek.infer.reasoning import ReasoningSplitter, split_reasoning
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.verify import NOT_SURE, judge, verify, vote
from nanoseek.model import Transformer, preset


def chain(answer: str) -> str:
    return f"<think>\nworking it out\n</think>\n<answer>\n{answer}\n</answer>"


def test_vote_groups_equal_values_and_ignores_missing_answers():
    assert vote(["1/2", None, "0.5", "3", "0.50"]) == ("1/2", 3, 0)
    assert vote([None, None]) == (None, 0, None)
    assert vote(["7", "8"]) == ("7", 1, 0)  # a tie goes to the answer seen first


def test_vote_takes_the_task_equality_and_calls_it_as_answer_then_group():
    # case-insensitive names: a task's own equality replaces value equality
    assert vote(["Paris", "Rome", "paris "], same=lambda a, b: a.strip().lower() == b.strip().lower()) == \
        ("Paris", 2, 0)
    # an asymmetric relation shows the argument order: "70" joins "7"'s group because "70".startswith("7")
    assert vote(["7", "70", "8"], same=str.startswith) == ("7", 2, 0)
    assert vote(["70", "7", "8"], same=str.startswith) == ("70", 1, 0)


def test_judge_confidence_and_threshold():
    sure = judge([chain("42"), chain("42.0"), chain("41"), chain("42")], threshold=0.5)
    assert (sure.answer, sure.votes, sure.confidence, sure.sure, sure.chosen) == ("42", 3, 0.75, True, 0)
    assert sure.reply == "42"
    unsure = judge([chain("1"), chain("2"), chain("3"), "<think>\nno answer, the reasoning never closed"], 0.5)
    assert not unsure.sure and unsure.confidence == 0.25
    assert unsure.reply.startswith(NOT_SURE) and "1 of 4" in unsure.reply
    assert unsure.answers[3] is None  # an answer inside unclosed reasoning does not count
    assert judge(["no tags at all, no answer"] * 2).reply.startswith(NOT_SURE)


def test_verify_with_a_trained_model_agrees(chat_model, tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        thinking=True)
    verdict = verify(Engine(chat_model, tokenizer, max_batch=4), ids, n=4,
                     params=SamplingParams(max_tokens=60, temperature=0.6, seed=0), prefill="<think>\n")
    assert verdict.sure and verdict.votes == 4 and verdict.reply == "hello there"
    assert all(c.startswith("<think>\n") for c in verdict.completions)


def test_verify_with_an_untrained_model_is_not_sure(tokenizer):
    torch.manual_seed(0)
    model = Transformer(preset("debug", vocab_size=tokenizer.vocab_size)).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    verdict = verify(Engine(model, tokenizer, max_batch=3), ids, n=3,
                     params=SamplingParams(max_tokens=10, temperature=1.0, seed=0))
    assert not verdict.sure and verdict.reply.startswith(NOT_SURE)


def test_reasoning_splitter_streams_tags_split_across_pieces():
    text = "they greet me\n</think>\n<answer>\nhello there\n</answer>"
    for size in (1, 2, 3, 7):
        splitter = ReasoningSplitter(thinking=True)
        parts = [splitter.feed(text[i:i + size]) for i in range(0, len(text), size)] + [splitter.flush()]
        reasoning, content = "".join(p[0] for p in parts), "".join(p[1] for p in parts)
        assert (reasoning.strip(), content.strip()) == ("they greet me", "hello there")
        assert "<" not in reasoning + content
    assert split_reasoning("<think>\nhmm\n</think>\nfine", thinking=False) == ("hmm", "fine")
    assert split_reasoning("a < b and c > d", thinking=False) == ("", "a < b and c > d")  # not tags
