"""Token shards and the loader: exact contents, worker-count independence, BOS-aligned packing, determinism,
exact resume (also across world sizes), disjoint ranks, and the data CLI end to end."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseek.cli import main as cli_main
from nanoseek.data.builtin import DataConfig, cached
from nanoseek.data.shards import TokenLoader, tokenize_corpus
from nanoseek.data.tokenizer import Tokenizer, train_tokenizer

SEQ = 48


def make_corpus(root: Path, n: int = 240) -> list[str]:
    """Documents tagged 'docN:' (recoverable from any row) with lengths from a few tokens to several rows."""
    rng = random.Random(1)
    words = "the a cat sat on mat and then ran far away over hills while birds sang 3 + 4 = 7".split()
    texts = [f"doc{i}: " + " ".join(rng.choice(words) for _ in range(rng.choice([2, 8, 20, 60, 150])))
             for i in range(n)]
    root.mkdir(parents=True)
    half = n // 2
    for name, part in (("a.jsonl", texts[:half]), ("b.jsonl", texts[half:])):
        with open(root / name, "w") as f:
            for i, t in enumerate(part):
                f.write(json.dumps({"id": f"{name}-{i}", "text": t}) + "\n")
            f.write("\n")  # blank lines are skipped
    return texts


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("shards")
    texts = make_corpus(root / "corpus")
    tok = train_tokenizer(texts, 320, root / "tok")
    index = tokenize_corpus(root / "corpus", root / "tok", root / "tokens", workers=1, val_fraction=0.1,
                            shard_tokens=1500, progress=False)
    return {"root": root, "texts": texts, "tok": tok, "index": index, "dir": root / "tokens"}


def docs_in(arr: np.ndarray, bos: int) -> list[np.ndarray]:
    starts = list(np.flatnonzero(arr == bos)) + [len(arr)]
    return [arr[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


def test_shards_hold_every_document_once(data: dict) -> None:
    tok, index, d = data["tok"], data["index"], data["dir"]
    assert index["dtype"] == "uint16" and index["tokenizer_hash"] == tok.hash
    found: dict[str, list[str]] = {}
    for split, info in index["splits"].items():
        assert len(info["shards"]) >= (2 if split == "train" else 1)
        texts = []
        for sh in info["shards"]:
            arr = np.fromfile(d / sh["name"], dtype=np.uint16)
            docs = docs_in(arr, tok.bos_id)
            assert len(arr) == sh["tokens"] and len(docs) == sh["documents"]
            texts += [tok.decode(doc[1:].tolist()) for doc in docs]
        found[split] = texts
        assert info["tokens"] == sum(len(tok.encode(t)) + 1 for t in texts)
        assert info["bytes"] == sum(len(t.encode()) for t in texts)
        assert info["documents"] == len(texts)
    assert sorted(found["train"] + found["val"]) == sorted(data["texts"])
    assert 0.03 < len(found["val"]) / len(data["texts"]) < 0.2


def test_output_does_not_depend_on_workers(data: dict, tmp_path: Path) -> None:
    root = data["root"]
    index = tokenize_corpus(root / "corpus", root / "tok", tmp_path, workers=2, val_fraction=0.1,
                            shard_tokens=1500, lines_per_chunk=7, progress=False)
    assert index["splits"] == data["index"]["splits"]
    for sh in index["splits"]["train"]["shards"] + index["splits"]["val"]["shards"]:
        assert (tmp_path / sh["name"]).read_bytes() == (data["dir"] / sh["name"]).read_bytes()


def row_docs(row: torch.Tensor, tok: Tokenizer, full: dict[int, list[int]]) -> list[int]:
    """Document numbers packed in a row; checks each piece is a whole document or (last piece) its prefix."""
    pieces = docs_in(row.numpy(), tok.bos_id)
    assert row[0] == tok.bos_id and sum(map(len, pieces)) == len(row)
    out = []
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        m = re.match(r"doc(\d+):", tok.decode(piece[1:].tolist()))
        if m is None:  # a crop too short to show its tag: still the start of some document
            assert last and any(doc[: len(piece)] == piece.tolist() for doc in full.values())
            continue
        expect = full[int(m[1])]
        assert piece.tolist() == (expect[: len(piece)] if last else expect)
        out.append(int(m[1]))
    return out


@pytest.fixture(scope="module")
def full_docs(data: dict) -> dict[int, list[int]]:
    return {i: data["tok"].encode(t, bos=True) for i, t in enumerate(data["texts"])}


def test_batches_are_bos_aligned_documents(data: dict, full_docs: dict) -> None:
    loader = TokenLoader(data["dir"], "train", SEQ, batch_size=4, seed=0)
    for _ in range(20):
        batch = next(loader)
        assert batch.shape == (4, SEQ + 1) and batch.dtype == torch.int64
        for row in batch:
            row_docs(row, data["tok"], full_docs)
    assert 0 < loader.cropped_fraction < 0.5  # the 150-word documents are longer than a row
    info = data["index"]["splits"]["train"]
    assert loader.bytes_per_token == info["bytes"] / info["tokens"]


def take(loader: TokenLoader, n: int) -> list[torch.Tensor]:
    return [next(loader) for _ in range(n)]


def test_deterministic_and_seeded(data: dict) -> None:
    a = take(TokenLoader(data["dir"], "train", SEQ, 3, seed=5), 6)
    b = take(TokenLoader(data["dir"], "train", SEQ, 3, seed=5), 6)
    c = take(TokenLoader(data["dir"], "train", SEQ, 3, seed=6), 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_exact_resume(data: dict) -> None:
    loader = TokenLoader(data["dir"], "train", SEQ, 3, seed=2)
    take(loader, 25)  # past the first epoch, so the saved state holds a reshuffled order
    assert loader.epoch >= 1
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores
    reference = take(loader, 10)
    resumed = TokenLoader(data["dir"], "train", SEQ, 3, seed=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(reference, take(resumed, 10), strict=True))
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(data["dir"], "train", SEQ + 1, 3, seed=2).load_state_dict(state)


def test_ranks_are_disjoint_and_world_size_invariant(data: dict, full_docs: dict) -> None:
    single = TokenLoader(data["dir"], "train", SEQ, 4, seed=1)
    ranks = [TokenLoader(data["dir"], "train", SEQ, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    seen: list[set[int]] = [set(), set()]
    while True:  # one epoch: every document at most once, on one rank only
        whole = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(whole[0::2], parts[0]) and torch.equal(whole[1::2], parts[1])
        if ranks[0].epoch > 0:  # this batch drew from the next epoch's reshuffled order: a document may repeat
            break
        for r in range(2):
            for row in parts[r]:
                seen[r].update(row_docs(row, data["tok"], full_docs))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_resume_on_another_world_size(data: dict) -> None:
    single = TokenLoader(data["dir"], "train", SEQ, 2, seed=4)
    take(single, 3)
    state = single.state_dict()
    after = take(single, 4)
    ranks = [TokenLoader(data["dir"], "train", SEQ, 1, rank=r, world_size=2, seed=4) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for whole in after:
        assert torch.equal(whole, torch.cat([next(ranks[0]), next(ranks[1])]))
    assert state["rows"] == 6  # not a multiple of 4: a 4-rank resume cannot split it evenly
    with pytest.raises(ValueError, match="world_size"):
        TokenLoader(data["dir"], "train", SEQ, 1, world_size=4, seed=4).load_state_dict(state)


def test_val_split_and_errors(data: dict, tmp_path: Path) -> None:
    val = TokenLoader(data["dir"], "val", SEQ, 2)
    assert next(val).shape == (2, SEQ + 1)
    with pytest.raises(FileNotFoundError, match="index.json"):
        TokenLoader(tmp_path, "train", SEQ, 2)
    with pytest.raises(ValueError, match="no split"):
        TokenLoader(data["dir"], "test", SEQ, 2)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: field 'text'"):
        tokenize_corpus(bad, data["root"] / "tok", tmp_path / "out", workers=1, progress=False)
    (bad / "x.jsonl").write_text('{"text": "ok"}\n{"text": "ok"\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: invalid JSON"):
        tokenize_corpus(bad, data["root"] / "tok", tmp_path / "out", workers=1, progress=False)


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = tmp_path
    assert cli_main(["data", "synth", "--output", str(d / "syn"), "--docs", "150", "--sft", "20", "--rl", "20",
                     "--eval-per-level", "10", "--difficulty", "1,2"]) == 0
    assert cli_main(["data", "tokenizer", "--input", str(d / "syn"), "--output", str(d / "tok"),
                     "--vocab-size", "400"]) == 0
    assert cli_main(["data", "tokenize", "--input", str(d / "syn"), "--tokenizer", str(d / "tok"),
                     "--output", str(d / "tokens"), "--workers", "2", "--val-fraction", "0.1"]) == 0
    index = json.loads((d / "tokens" / "index.json").read_text())
    assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == 150
    assert cli_main(["data", "tokenize", "--input", str(d / "missing"), "--tokenizer", str(d / "tok"),
                     "--output", str(d / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_cached_builtin_data_is_built_once_per_setting(tmp_path: Path) -> None:
    cfg = DataConfig(docs=120, vocab_size=400, seed=0, root=str(tmp_path))
    data = cached(cfg)
    tok_dir, tokens_dir = data / "tokenizer", data / "tokens"
    stamp = (tokens_dir / "index.json").stat().st_mtime_ns
    assert cached(DataConfig(docs=120, vocab_size=400, seed=0, root=str(tmp_path))) == data
    assert (tokens_dir / "index.json").stat().st_mtime_ns == stamp
    assert cached(DataConfig(docs=120, vocab_size=400, seed=0, difficulty="1", root=str(tmp_path))) != data
    assert (data / "curated" / "manifest.json").exists() and (data / "synth" / "sft.jsonl").exists()
    loader = TokenLoader(tokens_dir, "train", 64, 2)
    assert Tokenizer.load(tok_dir).vocab_size == 400 and next(loader).shape == (2, 65)
    assert not list(tmp_path.glob("*.tmp*"))


def test_the_domain_mix_sets_the_shares_of_the_drawn_tokens(tmp_path: Path) -> None:
    """[data] mix (issue 16): the domains' shares of the tokens the loader draws are within 2 points of the
    weights, whatever the corpus's own shares; resume keeps the mix and refuses another one."""
    rng = random.Random(0)
    words = "the a cat sat on mat and then ran far away over hills while birds sang".split()
    sizes = {"general": (600, 40), "math": (150, 12), "code": (60, 90)}  # documents, words each: skewed shares
    root = tmp_path / "corpus"
    root.mkdir()
    with open(root / "c.jsonl", "w") as f:
        for domain, (n, length) in sizes.items():
            for i in range(n):
                text = f"{domain}{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(length // 2, length)))
                f.write(json.dumps({"id": f"{domain}-{i}", "text": text, "domain": domain}) + "\n")
    tok = train_tokenizer([line for line in (root / "c.jsonl").read_text().splitlines()], 320, tmp_path / "tok")
    index = tokenize_corpus(root, tmp_path / "tok", tmp_path / "tokens", workers=1, val_fraction=0.05,
                            shard_tokens=4000, progress=False)
    natural = index["splits"]["train"]["domain_tokens"]
    assert set(natural) == set(sizes) and natural["general"] / sum(natural.values()) > 0.6
    target = {"general": 0.3, "math": 0.5, "code": 0.2}
    loader = TokenLoader(tmp_path / "tokens", "train", SEQ, 4, seed=3, mix=target)
    names = index["domains"]
    drawn = {d: 0 for d in target}
    for _ in range(3000):  # ~2 epochs of rows
        for doc, take in loader._next_row():
            drawn[names[loader.doc_domain[doc]]] += take
    total = sum(drawn.values())
    for domain, share in target.items():
        assert abs(drawn[domain] / total - share) < 0.02, (domain, drawn[domain] / total)
    # resume is exact with a mix too, and needs the same mix
    a = TokenLoader(tmp_path / "tokens", "train", SEQ, 4, seed=3, mix=target)
    for _ in range(200):
        next(a)
    state = a.state_dict()
    b = TokenLoader(tmp_path / "tokens", "train", SEQ, 4, seed=3, mix=target)
    b.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    assert all(torch.equal(next(a), next(b)) for _ in range(50))
    with pytest.raises(ValueError, match="mix"):
        TokenLoader(tmp_path / "tokens", "train", SEQ, 4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"does not have"):
        TokenLoader(tmp_path / "tokens", "train", SEQ, 4, mix={"poetry": 1.0})
