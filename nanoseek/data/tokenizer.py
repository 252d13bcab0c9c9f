"""Byte-level BPE tokenizer (HF `tokenizers`) with nanoseek's special tokens and chat template.

Ids 0-9 are fixed, so every tokenizer of every size agrees on them:
    0 <|bos|>  1 <|eos|>  2 <|pad|>  3 <|system|>  4 <|user|>  5 <|assistant|>
    6 <think>  7 </think>  8 <answer>  9 </answer>
Ids 0-5 are *control* tokens (HF "special"): a document's text can never produce them, so a web page that
happens to contain "<|bos|>" cannot fake a document boundary. The reasoning tags 6-9 are ordinary added tokens:
they are matched as single ids in any text, so pretraining documents that show worked solutions teach the same
ids the RL format rewards, and `decode(skip_special=True)` keeps them.

Pre-tokenisation splits every digit on its own (as DeepSeek-V3 and LLaMA do for numbers, here one digit per
piece): a small model then sees "37" as 3, 7 and can learn column arithmetic instead of memorising merges. A digit
keeps the space before it, as a word does: " 6" is one token, `Ġ6`, not `Ġ` then `6`. With a bare `Ġ` before every
number, each `Ġ` of "9 - 6 + 3" looks alike, and copying the expression (the first thing a worked solution does)
takes two tokens of context instead of one: the default run's bases then copied the second operand wrong in about
half their samples and R1-Zero barely moved them (README, "Where the lift comes from").

Chat template (DeepSeek-V3.1 style; the same string from Python and from the Jinja template saved with the
tokenizer, so `transformers.AutoTokenizer` gives identical ids):
    <|bos|>[<|system|>system text]<|user|>question<|assistant|>ANSWER<|eos|><|user|>...
where ANSWER is the assistant content as is when it starts with `<think>` (a reasoning answer), and
`</think>\\n` + content otherwise (a direct answer: an empty reasoning block was closed straight away).
The generation prompt is `<|assistant|>` followed by
    thinking=None  -> nothing (the model chooses: `<think>` reasons, `</think>` answers directly),
    thinking=True  -> `<think>\\n` (reason first),
    thinking=False -> `</think>\\n` (answer directly),
so each mode continues exactly as the training conversations did.

Images (the VL models): `add_image_token` gives a tokenizer with one more control token, `<image>`, at the next
free id. A user or system message marks where an image goes by writing `<image>`; `encode_chat(...,
image_tokens=n)` expands each placeholder to the n ids the vision tower's features replace (DeepSeek-VL2's
processor does the same). The Jinja template is unchanged: it renders `<image>` as text, which a VL tokenizer reads
as the one control id, so a text tokenizer's ids stay exactly what they were.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

CONTROL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
IMAGE_TOKEN = "<image>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

# Words with an optional leading space or punctuation, single digits with an optional leading space, punctuation
# runs, newlines, spaces.
SPLIT_PATTERN = r"[^\r\n\p{L}\p{N}]?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '<|system|>' + message['content'] -}}"
    "{%- elif message['role'] == 'user' -%}{{- '<|user|>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['content'].startswith('<think>') -%}{{- '<|assistant|>' + message['content'] + eos_token -}}"
    "{%- else -%}{{- '<|assistant|></think>\\n' + message['content'] + eos_token -}}{%- endif -%}"
    "{%- else -%}{{- raise_exception('unknown role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}"
    "{%- if thinking is defined and thinking is true -%}{{- '<think>\\n' -}}"
    "{%- elif thinking is defined and thinking is false -%}{{- '</think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Tokenizer:
    """A trained byte-level BPE with nanoseek's special tokens; see the module docstring for the conventions."""

    def __init__(self, tok: HFTokenizer):
        self._chat = tok  # recognises control tokens in text: used for chat templates, exactly like transformers
        self._plain = HFTokenizer.from_str(tok.to_str())  # treats control tokens in text as plain text
        self._plain.encode_special_tokens = True
        for i, t in enumerate(CONTROL_TOKENS + REASONING_TOKENS):
            if tok.token_to_id(t) != i:
                raise ValueError(f"tokenizer: special token {t!r} must have id {i}, has {tok.token_to_id(t)}")
        self.bos_id, self.eos_id, self.pad_id = 0, 1, 2
        self.system_id, self.user_id, self.assistant_id = 3, 4, 5
        self.think_id, self.end_think_id, self.answer_id, self.end_answer_id = 6, 7, 8, 9
        self.image_id = tok.token_to_id(IMAGE_TOKEN)  # None for a text-only tokenizer

    def add_image_token(self) -> Tokenizer:
        """This tokenizer with `<image>` as a control token at the next free id (itself if it has one): text can
        never produce it, so only a placeholder the caller wrote becomes an image."""
        if self.image_id is not None:
            return self
        tok = HFTokenizer.from_str(self._chat.to_str())
        tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
        return Tokenizer(tok)

    # ----- files

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        path = Path(directory) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, directory: str | Path) -> None:
        """tokenizer.json, tokenizer_config.json (with the Jinja chat template) and special_tokens_map.json:
        what `transformers.AutoTokenizer.from_pretrained(directory)` needs."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(d / "tokenizer.json", self._chat.to_str(pretty=True))
        special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
        additional = CONTROL_TOKENS[3:] + [IMAGE_TOKEN] * (self.image_id is not None)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast", **special,
            "additional_special_tokens": additional, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000, "chat_template": CHAT_TEMPLATE,
        }
        _atomic_write(d / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        _atomic_write(d / "special_tokens_map.json",
                      json.dumps({**special, "additional_special_tokens": additional}, indent=2) + "\n")

    @property
    def hash(self) -> str:
        """sha256 of the serialised tokenizer: token shards record it so they are never read with another one."""
        return hashlib.sha256(self._chat.to_str().encode()).hexdigest()

    # ----- text

    @property
    def vocab_size(self) -> int:
        return self._chat.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._chat.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._chat.id_to_token(i)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of a plain text (control tokens in it are just characters), optionally framed by BOS/EOS."""
        ids = self._plain.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`encode` over many texts at once (the Rust side runs them in parallel)."""
        out = self._plain.encode_batch_fast(list(texts), add_special_tokens=False)
        return [[self.bos_id] * bos + e.ids + [self.eos_id] * eos for e in out]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; skip_special drops the control tokens (BOS, EOS, PAD, roles), never the reasoning tags."""
        return self._chat.decode(list(ids), skip_special_tokens=skip_special)

    # ----- chat

    def _segments(self, messages: Sequence[dict], add_generation_prompt: bool,
                  thinking: bool | None) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, produced by the assistant) pieces. Every piece boundary touches a
        special token, so encoding the pieces one by one gives the ids of the whole string."""
        pieces: list[tuple[str, bool]] = [("<|bos|>", False)]
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: expected {{'role': ..., 'content': str}}, got {m!r}")
            role = m.get("role")
            if role not in ROLE_TOKENS:
                raise ValueError(f"message {i}: unknown role {role!r}; expected one of {sorted(ROLE_TOKENS)}")
            if role == "assistant":
                content = m["content"] if m["content"].startswith("<think>") else "</think>\n" + m["content"]
                pieces += [("<|assistant|>", False), (content + "<|eos|>", True)]
            else:
                pieces.append((ROLE_TOKENS[role] + m["content"], False))
        if add_generation_prompt:
            pieces.append(("<|assistant|>" + {None: "", True: "<think>\n", False: "</think>\n"}[thinking], False))
        return pieces

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                    thinking: bool | None = None) -> str:
        """The chat template as a string (what the Jinja template in tokenizer_config.json renders)."""
        return "".join(t for t, _ in self._segments(messages, add_generation_prompt, thinking))

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                    thinking: bool | None = None, image_tokens: int = 0) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation; mask is 1 on tokens the assistant produces (its content, including
        the `</think>\\n` of a direct answer, and the closing EOS) — the SFT loss positions. With image_tokens=n
        every `<image>` of a user or system message becomes n image ids (never trained on)."""
        if image_tokens and self.image_id is None:
            raise ValueError("image_tokens: this tokenizer has no <image> token (see add_image_token)")
        ids: list[int] = []
        mask: list[int] = []
        for text, trainable in self._segments(messages, add_generation_prompt, thinking):
            piece = self._chat.encode(text, add_special_tokens=False).ids
            if image_tokens and not trainable and self.image_id in piece:
                piece = [j for i in piece for j in ([i] * (image_tokens if i == self.image_id else 1))]
            ids += piece
            mask += [int(trainable)] * len(piece)
        return ids, mask

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            thinking: bool | None = None) -> list[int]:
        """Ids of a conversation; equal to transformers' `apply_chat_template(..., tokenize=True)`."""
        return self.encode_chat(messages, add_generation_prompt, thinking)[0]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None,
                    min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE of at most `vocab_size` ids (the 10 special tokens and 256 bytes included; fewer
    when the texts run out of pairs seen `min_frequency` times). Saved to `out_dir` when given."""
    reserved = len(CONTROL_TOKENS) + len(REASONING_TOKENS) + 256
    if vocab_size < reserved:
        raise ValueError(f"vocab_size must be at least {reserved} (special tokens + 256 bytes), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS + REASONING_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    # the trainer registers all ten as special; the reasoning tags become ordinary added tokens (module docstring)
    spec = json.loads(tok.to_str())
    for entry in spec["added_tokens"]:
        entry["special"] = entry["content"] in CONTROL_TOKENS
    tokenizer = Tokenizer(HFTokenizer.from_str(json.dumps(spec)))
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer
