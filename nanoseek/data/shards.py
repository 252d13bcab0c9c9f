"""Token shards: parallel tokenisation into flat binary files, and a deterministic, resumable loader.

On disk (`nanoseek data tokenize` writes it):
    index.json          dtype, vocab, tokenizer hash, and per split: shards [{name, tokens, documents}],
                        total tokens, documents and UTF-8 bytes (bytes/token turns loss into bits per byte)
    train_00000.bin     token ids, uint16 when the vocabulary fits (else uint32), documents back to back,
    val_00000.bin       each starting with BOS; a document never straddles two shards

The validation split is chosen per document by a hash of its id (or its text), so it does not depend on the
order of the input files or on the number of workers, and it stays fixed when the corpus grows.

The loader packs rows of seq_len + 1 tokens that always start at a document start (BOS), so the model never
trains on a context that begins mid-document:
  - documents come in a seeded shuffled order, reshuffled every epoch, epochs looping forever; with a domain
    mix (`[data] mix`, the domains the tokenizer recorded per document in `*.dom.npy`), an epoch takes each
    domain's documents as often as its weight asks, so the domains' shares of the drawn tokens are the weights;
  - each row is filled best-fit from a small look-ahead buffer (the largest document that still fits);
  - when nothing fits, the shortest buffered document is cropped to fill the row and its tail is dropped
    (so is the tail of any document longer than a row). `cropped_fraction` reports the loss; raise seq_len
    if it grows large.
Rows form one global stream. With world_size W, rank r takes rows r, r+W, r+2W, ...: ranks see disjoint data,
and the union of all ranks' batches is the same set of rows whatever W is, so the loss curve does not depend on
the number of processes. The state after each batch is identical on every rank (a row count that is a multiple
of W, the epoch, the cursor in the shuffled order and the buffer), so a checkpoint holds one small dict and can
be resumed exactly, even on a different number of ranks when the row count divides.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nanoseek.data.tokenizer import Tokenizer

INDEX = "index.json"
SPLITS = ("train", "val")
UNKNOWN_DOMAIN = "unknown"  # the domain of a record without a "domain" field


# ---------------------------------------------------------------------------------------------------------
# Reading a corpus directory


def corpus_files(path: str | Path) -> list[Path]:
    """JSONL files (.jsonl, .jsonl.gz, .jsonl.zst) of a corpus: a file, or a directory searched recursively.
    A curated output directory (with documents/) or a synth output directory (with corpus/) reads only those."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"corpus path {p} does not exist")
    if p.is_file():
        return [p]
    for sub in ("documents", "corpus"):
        if (p / sub).is_dir():
            p = p / sub
            break
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")))
    if not files:
        raise FileNotFoundError(f"no .jsonl / .jsonl.gz / .jsonl.zst files under {p}")
    return files


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    if path.name.endswith(".zst"):
        import zstandard  # optional dependency ("data" extra); only needed for .zst corpora

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_texts(path: Path, text_field: str = "text") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line; a malformed line is an error naming file, line and field."""
    with _open_text(path) as f:
        try:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield line_no, parse_record(line, path, line_no, text_field)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: invalid UTF-8 ({e.reason}) after line {line_no}") from e


def parse_record(line: str, path: Path | str, line_no: int, text_field: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: invalid JSON: {e.msg}") from e
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ValueError(f"{path}:{line_no}: field {text_field!r} missing or not a string")
    return record


# ---------------------------------------------------------------------------------------------------------
# Tokenising


def is_val(key: str, val_fraction: float) -> bool:
    """Deterministic per-document validation split from a hash of the document's id or text."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h < val_fraction * 2**64


_worker: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, text_field: str, id_field: str, val_fraction: float, dtype: str) -> None:
    _worker.update(tok=Tokenizer.load(tokenizer_dir), text_field=text_field, id_field=id_field,
                   val_fraction=val_fraction, dtype=np.dtype(dtype))


def _encode_chunk(chunk: tuple[str, int, list[str]]) -> dict[str, Any]:
    """Parse and encode one chunk of raw lines -> per split: concatenated [BOS, ids...] documents and counts."""
    path, first_line, lines = chunk
    w = _worker
    texts, splits, domains = [], [], []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        record = parse_record(line, path, first_line + k, w["text_field"])
        texts.append(record[w["text_field"]])
        domain = record.get("domain")
        domains.append(domain if isinstance(domain, str) and domain else UNKNOWN_DOMAIN)
        key = record.get(w["id_field"])
        splits.append("val" if is_val(key if isinstance(key, str) else texts[-1], w["val_fraction"]) else "train")
    out: dict[str, Any] = {"empty": sum(1 for t in texts if not t.strip())}
    encoded = w["tok"].encode_batch(texts, bos=True)
    for split in SPLITS:
        docs = [(ids, t, d) for ids, t, s, d in zip(encoded, texts, splits, domains, strict=True)
                if s == split and t.strip()]
        tokens = [np.array(ids, dtype=w["dtype"]) for ids, _, _ in docs]
        out[split] = {
            "tokens": np.concatenate(tokens) if tokens else np.zeros(0, dtype=w["dtype"]),
            "lengths": np.array([len(ids) for ids, _, _ in docs], dtype=np.int64),
            "bytes": sum(len(t.encode("utf-8")) for _, t, _ in docs),
            "domains": [d for _, _, d in docs],
        }
    return out


def _chunks(files: list[Path], lines_per_chunk: int) -> Iterator[tuple[str, int, list[str]]]:
    for path in files:
        with _open_text(path) as f:
            lines: list[str] = []
            first = 1
            try:
                for line_no, line in enumerate(f, 1):
                    lines.append(line)
                    if len(lines) == lines_per_chunk:
                        yield str(path), first, lines
                        lines, first = [], line_no + 1
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: invalid UTF-8 ({e.reason}) near line {first + len(lines)}") from e
            if lines:
                yield str(path), first, lines


class _ShardWriter:
    """Appends documents to `<split>_NNNNN.bin` files, closing a shard once it holds `shard_tokens` tokens
    (atomic writes). Cuts fall between documents, wherever the chunks that delivered them ended."""

    def __init__(self, out: Path, split: str, shard_tokens: int, domain_ids: dict[str, int]):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.domain_ids = domain_ids  # shared by the splits: domain name -> id in the .dom.npy files
        self.parts: list[np.ndarray] = []
        self.part_domains: list[int] = []
        self.buffered = self.docs = 0
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.documents = self.bytes = 0
        self.domain_tokens: dict[str, int] = {}

    def add(self, part: dict[str, Any]) -> None:
        tokens, lengths = part["tokens"], part["lengths"]
        self.tokens += len(tokens)
        self.documents += len(lengths)
        self.bytes += part["bytes"]
        for name, n in zip(part["domains"], lengths.tolist(), strict=True):
            self.part_domains.append(self.domain_ids.setdefault(name, len(self.domain_ids)))
            self.domain_tokens[name] = self.domain_tokens.get(name, 0) + n
        ends = np.cumsum(lengths)
        done = 0  # documents of this part already buffered
        while done < len(lengths):
            start = int(ends[done - 1]) if done else 0
            # documents up to and including the first that fills the shard, else all that are left
            full = np.flatnonzero(self.buffered + ends[done:] - start >= self.shard_tokens)
            take = int(full[0]) + 1 if len(full) else len(lengths) - done
            stop = int(ends[done + take - 1])
            self.parts.append(tokens[start:stop])
            self.buffered += stop - start
            self.docs += take
            done += take
            if self.buffered >= self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        name = f"{self.split}_{len(self.shards):05d}.bin"
        tmp = self.out / f"{name}.tmp{os.getpid()}"
        np.concatenate(self.parts).tofile(tmp)
        os.replace(tmp, self.out / name)
        domains = f"{self.split}_{len(self.shards):05d}.dom.npy"  # each document's domain id, in shard order
        with open(self.out / f"{domains}.tmp{os.getpid()}", "wb") as f:
            np.save(f, np.array(self.part_domains[:self.docs], dtype=np.uint16))
        os.replace(self.out / f"{domains}.tmp{os.getpid()}", self.out / domains)
        self.shards.append({"name": name, "tokens": self.buffered, "documents": self.docs, "domains": domains})
        self.parts, self.buffered = [], 0
        self.part_domains, self.docs = self.part_domains[self.docs:], 0

    def summary(self) -> dict[str, Any]:
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes,
                "domain_tokens": dict(sorted(self.domain_tokens.items()))}


def tokenize_corpus(input_path: str | Path, tokenizer_dir: str | Path, output_dir: str | Path,
                    workers: int | None = None, val_fraction: float = 0.01, shard_tokens: int = 2**25,
                    text_field: str = "text", id_field: str = "id", lines_per_chunk: int = 2048,
                    progress: bool = True) -> dict[str, Any]:
    """Tokenise every document of a JSONL corpus into BOS-prefixed token shards; returns the index.
    The output does not depend on `workers` (chunks are written in input order)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = corpus_files(input_path)
    tok = Tokenizer.load(tokenizer_dir)
    dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    domain_ids: dict[str, int] = {}
    writers = {s: _ShardWriter(out, s, shard_tokens, domain_ids) for s in SPLITS}
    init = (str(tokenizer_dir), text_field, id_field, val_fraction, dtype)
    workers = max(1, workers or os.cpu_count() or 1)
    bar = tqdm(desc="tokenize", unit="doc", disable=not progress)
    empty = 0

    def consume(results: Iterator[dict[str, Any]]) -> None:
        nonlocal empty
        for r in results:
            for s in SPLITS:
                writers[s].add(r[s])
            empty += r["empty"]
            bar.update(len(r["train"]["lengths"]) + len(r["val"]["lengths"]) + r["empty"])

    chunks = _chunks(files, lines_per_chunk)
    if workers == 1:
        _init_worker(*init)
        consume(map(_encode_chunk, chunks))
    else:
        # fork (where available) shares the imported modules; the tokenizer's own thread pool is switched off in
        # the children, which are the parallelism here
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            with ctx.Pool(workers, initializer=_init_worker, initargs=init) as pool:
                consume(pool.imap(_encode_chunk, chunks))
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
    bar.close()
    for w in writers.values():
        w.flush()
    index = {
        "version": 1, "dtype": dtype, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
        "tokenizer_hash": tok.hash, "tokenizer_dir": str(tokenizer_dir), "input": [str(f) for f in files],
        "val_fraction": val_fraction, "skipped_empty_documents": empty,
        "domains": sorted(domain_ids, key=domain_ids.get),  # names of the ids in the .dom.npy files
        "splits": {s: w.summary() for s, w in writers.items()},
    }
    tmp = out / f"{INDEX}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out / INDEX)
    keep = {sh["name"] for w in writers.values() for sh in w.shards}
    keep |= {sh["domains"] for w in writers.values() for sh in w.shards}
    for stale in [*out.glob("*_*.bin"), *out.glob("*_*.dom.npy")]:  # of an earlier, larger run in this directory
        if stale.name.split("_")[0] in SPLITS and stale.name not in keep:
            stale.unlink()
    return index


# ---------------------------------------------------------------------------------------------------------
# Loading


class TokenLoader:
    """Endless iterator of int64 batches [batch_size, seq_len + 1] (inputs = [:, :-1], targets = [:, 1:]).
    Packing, rank split and resume are described in the module docstring."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, buffer_docs: int = 64, mix: dict[str, float] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if seq_len < 1 or batch_size < 1 or buffer_docs < 1:
            raise ValueError("seq_len, batch_size and buffer_docs must be positive")
        self.dir = Path(data_dir)
        index_path = self.dir / INDEX
        if not index_path.exists():
            raise FileNotFoundError(f"{index_path} not found: run `nanoseek data tokenize` first")
        self.index = json.loads(index_path.read_text())
        if split not in self.index["splits"]:
            raise ValueError(f"{self.dir}: no split {split!r}; have {sorted(self.index['splits'])}")
        info = self.index["splits"][split]
        if info["documents"] == 0:
            raise ValueError(f"{self.dir}: split {split!r} has no documents (raise --val-fraction?)")
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.seed, self.buffer_docs = rank, world_size, seed, buffer_docs
        self.row_len = seq_len + 1
        bos = self.index["bos_id"]
        dtype = np.dtype(self.index["dtype"])
        self.shards: list[np.ndarray] = []
        shard_of, start_of = [], []
        for k, sh in enumerate(info["shards"]):
            path = self.dir / sh["name"]
            if not path.exists() or path.stat().st_size != sh["tokens"] * dtype.itemsize:
                raise ValueError(f"{path}: missing or not {sh['tokens']} {dtype} tokens as index.json says")
            arr = np.memmap(path, dtype=dtype, mode="r")
            starts = np.flatnonzero(arr == bos)
            if len(starts) != sh["documents"] or starts[0] != 0:
                raise ValueError(f"{path}: {len(starts)} BOS-aligned documents, index.json says {sh['documents']}")
            self.shards.append(arr)
            shard_of.append(np.full(len(starts), k, dtype=np.int32))
            start_of.append(starts)
        self.doc_shard = np.concatenate(shard_of)
        self.doc_start = np.concatenate(start_of).astype(np.int64)
        ends = np.concatenate([np.append(s[1:], len(a)) for s, a in zip(start_of, self.shards, strict=True)])
        self.doc_len = ends - self.doc_start
        self.fingerprint = f"{self.index['tokenizer_hash'][:16]}:{info['tokens']}:{info['documents']}"
        self.bytes_per_token = info["bytes"] / info["tokens"]
        self.mix = dict(sorted((mix or {}).items()))
        self.domains = self._mix_domains(info) if self.mix else None
        self.load_state_dict(None)

    def _mix_domains(self, info: dict[str, Any]) -> list[tuple[np.ndarray, float]]:
        """(documents, target share) of each domain the mix gives weight to, shares normalised over them. A
        domain the data has and the mix does not name gets no tokens; a weight for a domain the data lacks is an
        error naming both lists."""
        names = self.index.get("domains")
        if names is None or any("domains" not in sh for sh in info["shards"]):
            raise ValueError(f"{self.dir}: these shards record no document domains, so a domain mix cannot be "
                             f"applied: tokenize the corpus again with this version")
        missing = sorted(set(self.mix) - set(names))
        if missing:
            raise ValueError(f"[data] mix names domains {missing} that {self.dir} does not have (it has {names})")
        if any(w < 0 for w in self.mix.values()) or not any(self.mix.values()):
            raise ValueError(f"[data] mix {self.mix}: weights must be >= 0, at least one > 0")
        self.doc_domain = np.concatenate([np.load(self.dir / sh["domains"]) for sh in info["shards"]])
        total = sum(self.mix.values())
        out = []
        self.domain_of = np.full(len(self.doc_len), -1, dtype=np.int64)  # document -> its entry in the result
        for name, weight in self.mix.items():
            docs = np.flatnonzero(self.doc_domain == names.index(name))
            if weight and len(docs):
                self.domain_of[docs] = len(out)
                out.append((docs, weight / total))
        return out

    # ----- the row stream (identical on every rank)

    def _order(self, domain: int | None = None, epoch: int | None = None) -> np.ndarray:
        """The documents of an epoch (of one mix domain's documents) in a seeded order."""
        if domain is None:
            return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.doc_len))
        return np.random.default_rng([self.seed, epoch, domain]).permutation(self.domains[domain][0])

    def _refill(self) -> None:
        while len(self.buffer) < self.buffer_docs:
            if self.domains is not None:
                self.buffer.append(self._next_mixed())
                continue
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._order()
            self.buffer.append(int(self.order[self.cursor]))
            self.cursor += 1

    def _next_mixed(self) -> int:
        """The next document of the domain furthest below its share: tokens drawn so far plus those waiting in
        the buffer (at most a row of each) against the mix. Feedback on what packing really took keeps the
        shares exact whatever cropping drops; each domain cycles through its own seeded epochs."""
        waiting = np.zeros(len(self.domains))
        for doc in self.buffer:
            waiting[self.domain_of[doc]] += min(int(self.doc_len[doc]), self.row_len)
        have = self.drawn + waiting
        shares = np.array([share for _, share in self.domains])
        d = int(np.argmax(shares * have.sum() - have))  # ties -> the first domain
        if self.domain_cursor[d] == len(self.domains[d][0]):
            self.domain_epoch[d] += 1
            self.domain_cursor[d] = 0
            self.domain_order[d] = self._order(d, self.domain_epoch[d])
        doc = int(self.domain_order[d][self.domain_cursor[d]])
        self.domain_cursor[d] += 1
        return doc

    def _next_row(self) -> list[tuple[int, int]]:
        """Best-fit packing of one row: [(document, tokens taken from its start)]."""
        space, row = self.row_len, []
        while space > 0:
            self._refill()
            lens = self.doc_len[self.buffer]
            fits = lens <= space
            if fits.any():
                i = int(np.argmax(np.where(fits, lens, -1)))  # largest that fits; ties -> earliest in order
                take = int(lens[i])
            else:
                i = int(np.argmin(lens))  # crop the shortest; its tail is dropped
                take = space
                self.cropped += int(lens[i]) - space
            doc = self.buffer.pop(i)
            if self.domains is not None:
                self.drawn[self.domain_of[doc]] += take
            row.append((doc, take))
            space -= take
        self.rows += 1
        return row

    def _materialize(self, row: list[tuple[int, int]]) -> np.ndarray:
        parts = [self.shards[self.doc_shard[d]][self.doc_start[d]: self.doc_start[d] + n] for d, n in row]
        return np.concatenate(parts).astype(np.int64)

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> torch.Tensor:
        batch = []
        for _ in range(self.batch_size):
            for r in range(self.world_size):  # one stripe of the global stream; this rank keeps its own row
                row = self._next_row()
                if r == self.rank:
                    batch.append(self._materialize(row))
        return torch.from_numpy(np.stack(batch))

    @property
    def cropped_fraction(self) -> float:
        """Share of the tokens drawn so far (on all ranks) that were dropped by cropping."""
        return self.cropped / max(1, self.cropped + self.rows * self.row_len)

    # ----- resume

    def state_dict(self) -> dict[str, Any]:
        """Position in the global row stream; the same dict on every rank after each batch."""
        return {"split": self.split, "seq_len": self.seq_len, "seed": self.seed, "buffer_docs": self.buffer_docs,
                "fingerprint": self.fingerprint, "mix": self.mix, "epoch": self.epoch, "cursor": self.cursor,
                "buffer": list(self.buffer), "rows": self.rows, "cropped": self.cropped,
                **({"drawn": self.drawn.tolist(), "domain_epoch": list(self.domain_epoch),
                    "domain_cursor": list(self.domain_cursor)} if self.domains is not None else {})}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue exactly after the batches that produced `state` (None: start from the beginning)."""
        for key in ("split", "seq_len", "seed", "buffer_docs", "fingerprint", "mix"):
            if state is not None and state.get(key, {} if key == "mix" else None) != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state.get(key)!r}, this loader has "
                                 f"{getattr(self, key)!r}")  # ("mix" is absent from states before mixing)
        if self.domains is not None:  # per mix domain: tokens drawn, its own epoch and cursor
            n = len(self.domains)
            self.drawn = np.array(state["drawn"] if state else [0] * n, dtype=np.float64)
            self.domain_epoch = list(state["domain_epoch"]) if state else [0] * n
            self.domain_cursor = list(state["domain_cursor"]) if state else [0] * n
            self.domain_order = [self._order(d, e) for d, e in enumerate(self.domain_epoch)]
        if state is None:
            self.epoch, self.cursor, self.buffer, self.rows, self.cropped = 0, 0, [], 0, 0
            self.order = self._order()
            return
        if state["rows"] % self.world_size:
            raise ValueError(f"loader state is at row {state['rows']}, not a multiple of world_size "
                             f"{self.world_size}: resume with a world size that divides it")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.rows, self.cropped = state["rows"], state["cropped"]
        self.buffer = [int(d) for d in state["buffer"]]
        self.order = self._order()
