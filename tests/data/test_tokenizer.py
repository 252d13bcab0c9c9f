"""Tokenizer: lossless round trip, fixed special ids, and ids identical to transformers' for text and chats."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nanoseek.data.synth import make_problems
from nanoseek.data.synth.text import GENERATORS
from nanoseek.data.tokenizer import CONTROL_TOKENS, REASONING_TOKENS, Tokenizer, train_tokenizer

SAMPLES = [
    "Hello, world!  Two spaces, a tab\tand\nnewlines\n\n",
    "Numbers: 1234567890, 3.14159, -42, 1,000,000 and 007.",
    "Unicode: héllo wörld, naïve café, 東京, Ελληνικά, emoji 🙂🚀, combining e\u0301.",
    "<think>\n3 + 5 = 8\n</think>\n<answer>\n8\n</answer>",
    "Literal control tokens stay text: <|bos|> <|eos|> <|user|> <|assistant|>",
    "",
    " leading and trailing spaces ",
    "\x00\x01 control bytes \ufeff BOM and \u200b zero width",
]

CHATS = [
    [{"role": "user", "content": "What is 3 + 5?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 * 4?"},
     {"role": "assistant", "content": "<think>\n2 * 4 = 8\n</think>\n<answer>\n8\n</answer>"},
     {"role": "user", "content": "Thanks. Ünïcödé 🙂 and <|eos|> inside."}],
    [{"role": "user", "content": "  spaces  \n\n"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "again"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    texts = [fn(rng) for _ in range(150) for gens in GENERATORS.values() for _, fn in gens]
    texts += [f"{p.question}\n{p.reasoning()}" for p in make_problems("word_problems", 300, difficulty=[1, 2])]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, 600, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.load(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_round_trip(tok: Tokenizer) -> None:
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode(text, bos=True, eos=True) == [tok.bos_id] + ids + [tok.eos_id]


def test_special_ids(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 600
    for i, t in enumerate(CONTROL_TOKENS + REASONING_TOKENS):
        assert tok.token_to_id(t) == i
    # reasoning tags are single ids inside any text; control tokens in a document are only characters
    ids = tok.encode("x<think>y</think><answer>z</answer>")
    assert [i for i in ids if i < 10] == [tok.think_id, tok.end_think_id, tok.answer_id, tok.end_answer_id]
    assert not [i for i in tok.encode(SAMPLES[4]) if i < 10]
    assert tok.decode([tok.bos_id, tok.think_id, tok.eos_id], skip_special=True) == "<think>"


def test_digits_are_split(tok: Tokenizer) -> None:
    ids = tok.encode("31415926 + 2718")
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits == list("31415926") + [" 2"] + list("718")


def test_a_digit_keeps_its_leading_space() -> None:
    # " 6" is one piece, so each number of "9 - 6 + 3" is a token of its own, not a shared bare space before it
    tok = train_tokenizer([f"What is {a} - {b} + {c}?" for a in range(10) for b in range(10) for c in range(10)],
                          vocab_size=300)
    pieces = [tok.decode([i]) for i in tok.encode("9 - 6 + 3")]
    assert pieces == ["9", " -", " 6", " +", " 3"]


def test_save_load_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.hash == tok.hash and again.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing")


def test_plain_text_ids_match_transformers(tok: Tokenizer, hf) -> None:
    for text in SAMPLES[:4] + SAMPLES[5:]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text


@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("generation", [False, True])
@pytest.mark.parametrize("thinking", [None, True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf, chat: int, generation: bool,
                                            thinking: bool | None) -> None:
    messages = CHATS[chat]
    kwargs = {} if thinking is None else {"thinking": thinking}
    theirs = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation, **kwargs)
    theirs = theirs["input_ids"] if not isinstance(theirs, list) else theirs
    assert tok.apply_chat_template(messages, add_generation_prompt=generation, thinking=thinking) == theirs
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kwargs)
    assert tok.render_chat(messages, generation, thinking) == rendered


def test_chat_conventions_and_mask(tok: Tokenizer) -> None:
    messages = CHATS[1]
    ids, mask = tok.encode_chat(messages)
    assert ids[0] == tok.bos_id and ids[-1] != tok.eos_id  # ends with a user turn
    # the trained positions are exactly the assistant replies, each closed by EOS
    spans, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    assert [tok.decode(s) for s in spans] == ["</think>\nHello!<|eos|>", messages[4]["content"] + "<|eos|>"]
    prompt = tok.apply_chat_template(messages[:4], add_generation_prompt=True, thinking=True)
    assert tok.decode(prompt).endswith("What is 2 * 4?<|assistant|><think>\n")
    direct = tok.apply_chat_template(messages[:4], add_generation_prompt=True, thinking=False)
    assert tok.decode(direct).endswith("<|assistant|></think>\n")
    with pytest.raises(ValueError, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "hi"}])


def test_vocab_size_too_small() -> None:
    with pytest.raises(ValueError, match="at least 266"):
        train_tokenizer(["abc"], 100)
