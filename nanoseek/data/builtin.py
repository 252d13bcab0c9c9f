"""The built-in data set, built one way for every command: synthetic corpora -> curation -> tokenizer -> token
shards, with the SFT, RL and held-out evaluation sets beside them.

`nanoseek run` builds it into OUT/data (`build`). `nanoseek pretrain` and the post-training commands, given a
recipe without data of their own, build the same thing once into a cache directory named after the settings
(`cached`, under ~/.cache/nanoseek/data or $NANOSEEK_DATA), so the same [data] table always means the same tokens.

    OUT/synth/      corpus/*.jsonl, sft.jsonl, rl.jsonl, eval/<task>.jsonl, synth.json
    OUT/curated/    documents/ (what pretraining reads), manifest.json, data_card.md
    OUT/sets/       sft.jsonl, rl.jsonl: the SFT conversations and RL problems after curation (what the stages
                    read); sft/ and rl/ hold each one's curation (manifest.json, data_card.md, removed/)
    OUT/tokenizer/  the BPE tokenizer trained on the curated documents
    OUT/tokens/     train and val token shards
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.data.shards import INDEX, corpus_files, read_texts, tokenize_corpus
from nanoseek.data.synth.corpus import FACT_SHEET_SHARE


@dataclass
class DataConfig:
    """[data]: the built-in data set's size and shape, or the outputs of `nanoseek data` to use instead."""

    docs: int = 2000  # pretraining documents
    vocab_size: int = 4096
    seed: int = 0
    difficulty: str = "1-3"  # task levels of the worked problems in the corpus
    mix: dict[str, float] = field(default_factory=dict)  # domain shares: of the built corpus (docs) and of the training
    # tokens the loader draws ({}: synth's DOMAIN_MIX for the corpus, the corpus as it is for the tokens)
    task_mix: dict[str, float] = field(default_factory=dict)  # task weights of worked-problem documents ({}: equal)
    fact_share: float = FACT_SHEET_SHARE  # share of arithmetic documents that are number-fact sheets
    curate: dict[str, Any] = field(default_factory=dict)  # CurateConfig overrides, e.g. {quality = {min_words = 20}}
    root: str = ""  # the cache of built data sets ("" -> ~/.cache/nanoseek/data or $NANOSEEK_DATA); `run` uses OUT
    tokenizer_dir: str = ""  # both set: pretrain on these instead of the built-in data
    tokens_dir: str = ""

    def validate(self) -> None:
        if self.docs < 1 or self.vocab_size < 300:
            raise ValueError(f"[data] docs={self.docs}, vocab_size={self.vocab_size}: need docs >= 1 and "
                             f"vocab_size >= 300 (the byte alphabet and the special tokens)")
        if not 0.0 <= self.fact_share <= 1.0:
            raise ValueError(f"[data] fact_share={self.fact_share}: must be in [0, 1]")
        if bool(self.tokenizer_dir) != bool(self.tokens_dir):
            raise ValueError("[data] tokenizer_dir and tokens_dir must be given together")


# the post-training sets the data set builds, and the domain their curation records them under
SETS = {"sft.jsonl": "dialogue", "rl.jsonl": "math_logic"}


def training_set(root: str | Path, name: str) -> Path:
    """The curated training set `name` (sft.jsonl, rl.jsonl) of the data set built into `root`."""
    return Path(root) / "sets" / name


def corpus_texts(path: str | Path, text_field: str = "text", max_chars: int | None = None) -> list[str]:
    """The texts of a JSONL corpus, in file order, up to `max_chars` characters."""
    texts, total = [], 0
    for f in corpus_files(path):
        for _, record in read_texts(f, text_field):
            texts.append(record[text_field])
            total += len(texts[-1])
            if max_chars is not None and total >= max_chars:
                return texts
    return texts


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build(out: str | Path, cfg: DataConfig, progress: bool = True) -> dict[str, Any]:
    """Build the data set into `out` (see the module docstring); returns what was made: the synth manifest,
    curation totals, vocabulary size and tokens per split."""
    from nanoseek.data.curate import curate, curate_set, load_config, set_config
    from nanoseek.data.synth import write_synth
    from nanoseek.data.tokenizer import train_tokenizer

    out = Path(out)
    extra = min(2000, max(200, cfg.docs))  # SFT and RL sets grow with the corpus up to the synth defaults
    synth = write_synth(out / "synth", docs=cfg.docs, seed=cfg.seed, difficulty=cfg.difficulty, sft=extra, rl=extra,
                        mix=cfg.mix or None, task_mix=cfg.task_mix or None, fact_share=cfg.fact_share)
    curate_cfg = load_config(overrides=[f"{k}={json.dumps(v)}" for k, v in _flatten(cfg.curate).items()])
    manifest = curate([out / "synth" / "corpus"], out / "curated", curate_cfg)
    sets = {}
    for name in SETS:  # the training sets pass curation too: PII, toxicity, dedup, decontamination against the
        # held-out problems this data set was drawn with (the generator keeps them apart; this checks it)
        set_cfg = set_config()
        set_cfg.decontam.paths = tuple(str(p) for p in sorted((out / "synth" / "eval").glob("*.jsonl")))
        set_cfg.input.sources = {str(out / "synth" / name): {"domain": SETS[name]}}
        totals = curate_set([out / "synth" / name], out / "sets" / Path(name).stem, out / "sets" / name,
                            set_cfg)["totals"]
        sets[name] = {k: totals[k] for k in ("records", "kept", "removed", "rejected")}
    documents = out / "curated" / "documents"
    tokenizer = train_tokenizer(corpus_texts(documents), cfg.vocab_size, out / "tokenizer")
    # at least ~50 validation documents, at most 10% of a small corpus; one process is fastest at this size
    val_fraction = min(0.1, max(0.01, 50 / max(1, cfg.docs)))
    index = tokenize_corpus(documents, out / "tokenizer", out / "tokens", workers=1 if cfg.docs <= 20_000 else None,
                            val_fraction=val_fraction, progress=progress)
    return {"synth": synth, "curation": manifest["totals"], "sets": sets, "vocab_size": tokenizer.vocab_size,
            "tokens": {split: s["tokens"] for split, s in index["splits"].items()}}


def default_root() -> Path:
    return Path(os.environ.get("NANOSEEK_DATA", Path.home() / ".cache" / "nanoseek" / "data"))


FORMAT = 3  # 2: token shards record each document's domain (*.dom.npy), which [data] mix needs; 3: sets/


def cached(cfg: DataConfig) -> Path:
    """The data set of these settings in the cache, built unless already there; its directory. It is built
    under a temporary name and renamed when complete, so an interrupted or concurrent build never leaves a
    half-written directory behind a finished-looking name."""
    root = Path(cfg.root).expanduser() if cfg.root else default_root()
    shape = {k: v for k, v in asdict(cfg).items() if k not in ("root", "tokenizer_dir", "tokens_dir")}
    shape["format"] = FORMAT  # a cache written in another layout is built again, not misread
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:8]
    target = root / f"builtin-n{cfg.docs}-v{cfg.vocab_size}-s{cfg.seed}-{digest}"
    if (target / "tokens" / INDEX).exists():
        return target
    if target.exists():  # left by a crash before the build finished
        shutil.rmtree(target)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp, cfg, progress=False)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first; its copy is identical
        if not (target / "tokens" / INDEX).exists():
            raise
        shutil.rmtree(tmp)
    return target
