"""The curation pipeline: stages as plain functions over document streams, run as independent shard tasks.

Inputs are grouped into tasks of about `task_bytes` each, and a task runs in four phases:

  1. filter   (parallel, one task per worker process)
              read -> normalize -> language -> quality -> toxicity -> decontamination -> pii
              Each stage is a generator over a stream of items (Document, Removal, Reject): it transforms or
              removes Documents and passes everything else through, so stages compose by nesting and each
              removal carries its stage and reason. Survivors go to `work/task-N/docs.jsonl` together with
              their content digests and MinHash signatures, computed in vectorised batches.
  2. dedup    (global, one process) exact dedup on the digests of all tasks, then LSH candidate pairs band
              by band, verified against the signatures, and union-find clusters over the rest; the first
              document of a cluster in input order is kept. Decisions go to `work/dedup/task-N.json`.
  3. write    (parallel) `documents/shard-N.jsonl` (kept), `removed/shard-N.jsonl` (id, stage, reason),
              `rejects/shard-N.jsonl` (file, line, reason).
  4. manifest `manifest.json` and `data_card.md`; the accounting identity is checked.

Every output is written to a temporary file and renamed into place, and each phase of each task leaves a
marker (`stats.json`, `written.json`) only when complete, so an interrupted run resumes where it stopped:
finished tasks are skipped, half-written ones are redone. The run's configuration and input files are
fingerprinted; resuming with different ones is refused.

On a cluster, start the same command on every rank with a shared output directory. Rank and world size come
from RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/SLURM_NTASKS (srun). Rank r filters tasks r, r + W, ...
with its own worker pool. The global dedup stage needs every task's signatures, so ranks meet at a barrier
on the shared filesystem (each task's `stats.json`); rank 0 runs the dedup pass, which memory-maps the
per-task signature files and builds one band's keys at a time (memory ~ 8 bytes x documents per band,
16 bytes x documents of digests, and the signatures of candidate pairs only), while the other ranks wait for
`work/dedup/done.json`; then every rank writes its own shards and rank 0 writes the manifest once all
`written.json` markers exist. If a rank dies, rerun the same command: finished tasks are skipped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from nanoseek.common import write_json
from nanoseek.data.curate.bias import BiasConfig, add, count_mentions
from nanoseek.data.curate.decontam import DecontamConfig, EvalIndex, load_index
from nanoseek.data.curate.dedup import (
    DedupConfig,
    MinHasher,
    band_key,
    content_hash,
    exact_duplicate_roots,
    lsh_edges,
    signature_agreement,
    union_find,
)
from nanoseek.data.curate.filters import QualityConfig, quality
from nanoseek.data.curate.langid import LangIdConfig, language_reason
from nanoseek.data.curate.manifest import MixConfig, build_manifest, data_card, reason_kind
from nanoseek.data.curate.normalize import normalize_text
from nanoseek.data.curate.pii import PiiConfig, redact
from nanoseek.data.curate.toxicity import ToxicityClassifier, ToxicityConfig, toxicity_reason, train_classifier
from nanoseek.data.sources import (
    Document,
    InputConfig,
    InputFile,
    Reject,
    conversation,
    discover,
    read,
    render,
)


@dataclass
class CurateConfig:
    """Every stage is on by default; each has its own table of thresholds (e.g. `[quality]`, `[dedup]`)."""

    input: InputConfig = field(default_factory=InputConfig)
    normalize: bool = True
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    toxicity: ToxicityConfig = field(default_factory=ToxicityConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    bias: BiasConfig = field(default_factory=BiasConfig)
    workers: int = 0  # worker processes per rank; 0 = every core this process may use
    task_bytes: int = 64 << 20  # inputs are grouped into tasks of about this many bytes (a file is never split)
    keep_work: bool = False  # keep `work/` (per-task intermediates) after a successful run
    barrier_timeout_s: float = 7 * 24 * 3600.0  # how long a rank waits for the others on a cluster
    poll_s: float = 2.0  # barrier polling interval

    def stage_enabled(self) -> dict[str, bool]:
        return {
            "normalize": self.normalize, "language": self.langid.enabled, "quality": self.quality.enabled,
            "toxicity": self.toxicity.enabled, "decontamination": self.decontam.enabled, "pii": self.pii.enabled,
            "exact_dedup": self.dedup.exact, "near_dedup": self.dedup.near,
        }


@dataclass
class Removal:
    """A document removed by a stage."""

    doc: Document
    stage: str
    reason: str


Item = Document | Removal | Reject
Stream = Iterator[Item]


@dataclass
class Task:
    index: int
    files: list[InputFile]

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


# ---------------------------------------------------------------------------------------------------------
# Stages: plain functions from a stream of items to a stream of items


def filter_stage(items: Iterable[Item], stage: str, check: Callable[[Document], str | None],
                 skip_domains: tuple[str, ...] = ()) -> Stream:
    """Remove the documents for which `check` gives a reason; documents of `skip_domains` pass unchecked."""
    for item in items:
        if isinstance(item, Document) and item.domain not in skip_domains:
            reason = check(item)
            if reason:
                yield Removal(item, stage, reason)
                continue
        yield item


def normalize_stage(items: Iterable[Item]) -> Stream:
    for item in items:
        if isinstance(item, Document):
            item.map_turns(normalize_text)
            if not item.text.strip():
                yield Removal(item, "normalize", "normalize: no text left after removing control characters")
                continue
        yield item


def quality_stage(items: Iterable[Item], config: QualityConfig) -> Stream:
    def check(doc: Document) -> str | None:
        if doc.turns is not None:  # a conversation is judged on its assistant turns, and never cut
            return quality(doc.judged(), config)[1]
        doc.text, reason = quality(doc.text, config)  # C4 line cleaning may shorten the text
        return reason

    return filter_stage(items, "quality", check, config.skip_domains)


def language_stage(items: Iterable[Item], config: LangIdConfig) -> Stream:
    return filter_stage(items, "language", lambda d: language_reason(d.text, config), config.skip_domains)


def toxicity_stage(items: Iterable[Item], config: ToxicityConfig, classifier: ToxicityClassifier) -> Stream:
    return filter_stage(items, "toxicity", lambda d: toxicity_reason(d.judged(), config, classifier))


def decontam_stage(items: Iterable[Item], index: EvalIndex, batch: int = 512) -> Stream:
    """Checks documents in batches (one vectorised n-gram lookup per batch); order is preserved."""
    pending: list[Item] = []
    docs: list[Document] = []

    def flush() -> Stream:
        matches = iter(index.match([d.text for d in docs]))
        for item in pending:
            if isinstance(item, Document):
                hit = next(matches)
                if hit is not None:
                    name, count = hit
                    yield Removal(item, "decontamination",
                                  f"decontamination: shares {count} word n-gram(s) with eval set {name!r}")
                    continue
            yield item
        pending.clear()
        docs.clear()

    for item in items:
        pending.append(item)
        if isinstance(item, Document):
            docs.append(item)
            if len(docs) >= batch:
                yield from flush()
    yield from flush()


def pii_stage(items: Iterable[Item], config: PiiConfig, counts: Counter[str]) -> Stream:
    """Redacts in place; never removes a document. Replacement counts are added to `counts`."""
    for item in items:
        if isinstance(item, Document):
            def redacted(text: str) -> str:
                text, found = redact(text, config)
                counts.update(found)
                return text

            item.map_turns(redacted)  # inside every turn of a conversation
        yield item


# ---------------------------------------------------------------------------------------------------------
# Per-process resources: loaded once per worker, not once per task


_RESOURCES: dict[str, Any] = {}


def _init_worker(eval_index: EvalIndex | None) -> None:
    _RESOURCES.clear()
    _RESOURCES["eval_index"] = eval_index


def _classifier(config: ToxicityConfig) -> ToxicityClassifier:
    key = ("toxicity", config.train_path, config.categories)
    if key not in _RESOURCES:
        _RESOURCES[key] = train_classifier(config)
    return _RESOURCES[key]


def local_stages(config: CurateConfig, eval_index: EvalIndex | None, pii_counts: Counter[str]
                 ) -> list[Callable[[Iterable[Item]], Stream]]:
    """The per-document stages in order, as stream functions; switched-off stages are left out."""
    stages: list[Callable[[Iterable[Item]], Stream]] = []
    if config.normalize:
        stages.append(normalize_stage)
    if config.langid.enabled:  # before quality: the quality rules (stop words, punctuation) assume English
        stages.append(functools.partial(language_stage, config=config.langid))
    if config.quality.enabled:
        stages.append(functools.partial(quality_stage, config=config.quality))
    if config.toxicity.enabled:
        stages.append(functools.partial(toxicity_stage, config=config.toxicity,
                                        classifier=_classifier(config.toxicity)))
    if config.decontam.enabled:
        if eval_index is None:
            raise ValueError("decontamination is enabled but no eval index was built")
        stages.append(functools.partial(decontam_stage, index=eval_index))
    if config.pii.enabled:
        stages.append(functools.partial(pii_stage, config=config.pii, counts=pii_counts))
    return stages


# ---------------------------------------------------------------------------------------------------------
# Files


class JsonlWriter:
    """Writes JSON lines to a temporary file that replaces `path` only when the block exits cleanly."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        self.count = 0
        self._file: TextIO | None = None

    def __enter__(self) -> JsonlWriter:
        self._file = open(self.tmp, "w", encoding="utf-8")
        return self

    def write(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        assert self._file is not None
        self._file.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    """One line per event; a single write() of a short line keeps lines whole even with several writers."""
    line = json.dumps({"time": round(time.time(), 3), **record}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# Phase 1: filter one task


def filter_task(task: Task, config: CurateConfig, work: Path, eval_index: EvalIndex | None = None) -> dict[str, Any]:
    """Run the per-document stages over one task and write its survivors, digests and MinHash signatures under
    `work/task-N/`. `stats.json` is written last and marks the task as done. Returns the task's statistics."""
    if eval_index is None:
        eval_index = _RESOURCES.get("eval_index")
    out = work / f"task-{task.name}"
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pii_counts: Counter[str] = Counter()
    sources: dict[str, Counter[str]] = {}
    removed: Counter[str] = Counter()
    reasons: dict[str, Counter[str]] = {}
    reject_reasons: Counter[str] = Counter()
    hasher = MinHasher(config.dedup.num_perm, config.dedup.ngram, config.dedup.seed)
    sigs: list[np.ndarray] = []
    digests: list[bytes] = []
    refs: list[list[Any]] = []
    batch: list[str] = []

    def flush() -> None:
        if batch:
            sigs.append(hasher.signatures(batch))
            batch.clear()

    items: Iterable[Item] = (item for f in task.files for item in read(f, config.input))
    for stage in local_stages(config, eval_index, pii_counts):
        items = stage(items)
    with JsonlWriter(out / "docs.jsonl") as docs, JsonlWriter(out / "removed.jsonl") as rem, \
            JsonlWriter(out / "rejects.jsonl") as rej:
        for item in items:
            if isinstance(item, Reject):
                rej.write({"file": item.file, "line": item.line, "reason": item.reason})
                sources.setdefault(item.file, Counter()).update(records=1, rejected=1)
                reject_reasons[reason_kind(item.reason)] += 1
            elif isinstance(item, Removal):
                rem.write({"id": item.doc.id, "stage": item.stage, "reason": item.reason,
                           "source": item.doc.source, "line": item.doc.line})
                sources.setdefault(item.doc.source, Counter()).update(records=1, removed=1)
                removed[item.stage] += 1
                reasons.setdefault(item.stage, Counter())[reason_kind(item.reason)] += 1
            else:
                digest = content_hash(item.text)
                record = {"id": item.id, **item.body(), "source": item.source, "line": item.line,
                          "domain": item.domain, "license": item.license, "tag": item.tag,
                          "content_hash": f"sha256:{digest}"}
                if item.meta:
                    record["meta"] = item.meta
                docs.write(record)
                sources.setdefault(item.source, Counter()).update(records=1)
                digests.append(bytes.fromhex(digest)[:16])
                refs.append([item.id, item.source, item.line])
                batch.append(item.text)
                if len(batch) >= config.dedup.batch_docs:
                    flush()
        flush()
    n = len(refs)
    _save_npy(out / "sigs.npy", np.concatenate(sigs) if sigs else np.zeros((0, hasher.num_perm), np.uint32))
    _save_npy(out / "digests.npy", np.array(digests, dtype="S16") if digests else np.zeros(0, "S16"))
    write_json(out / "refs.json", refs)
    records = sum(c["records"] for c in sources.values())
    seconds = time.time() - start
    stats = {
        "task": task.index, "survivors": n, "records": records, "seconds": round(seconds, 3),
        "sources": {s: dict(c) for s, c in sources.items()}, "removed": dict(removed),
        "reasons": {s: dict(c) for s, c in reasons.items()}, "reject_reasons": dict(reject_reasons),
        "pii": dict(pii_counts),
    }
    write_json(out / "stats.json", stats)
    return stats


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Phase 2: global dedup


def global_dedup(tasks: list[Task], config: DedupConfig, work: Path) -> dict[str, int]:
    """Exact then near dedup over the survivors of every task; writes `work/dedup/task-N.json` with
    {local index: [stage, reason, duplicate_of]} for each dropped document, then `work/dedup/done.json`."""
    task_dirs = [work / f"task-{t.name}" for t in tasks]
    digests = [np.load(d / "digests.npy") for d in task_dirs]
    sizes = np.array([d.size for d in digests], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    n = int(offsets[-1])
    refs = [ref for d in task_dirs for ref in json.loads((d / "refs.json").read_text())]
    stage = np.zeros(n, dtype=np.int8)  # 0 kept, 1 exact duplicate, 2 near duplicate
    root = np.arange(n, dtype=np.int64)
    if config.exact and n:
        first = exact_duplicate_roots(np.concatenate(digests))
        dup = first != root
        stage[dup], root[dup] = 1, first[dup]
    if config.near and n:
        alive = np.flatnonzero(stage == 0)
        sig_files = [np.load(d / "sigs.npy", mmap_mode="r") for d in task_dirs]  # [n_task, P] each, on disk

        def band_columns() -> Iterator[np.ndarray]:
            r = config.rows
            for b in range(config.bands):  # one band's keys in memory at a time
                yield np.concatenate([band_key(np.asarray(s[:, b * r : (b + 1) * r])) for s in sig_files])[alive]

        def rows(index: np.ndarray) -> np.ndarray:  # signatures of documents (global indices) from their files
            task_of = np.searchsorted(offsets, index, side="right") - 1
            out = np.empty((index.size, config.num_perm), dtype=np.uint32)
            for t in np.unique(task_of):
                sel = task_of == t
                out[sel] = sig_files[t][index[sel] - offsets[t]]
            return out

        u, v = lsh_edges(band_columns())
        if config.verify and u.size:
            keep = signature_agreement(rows(alive[u]), rows(alive[v])) >= config.verify_cut
            u, v = u[keep], v[keep]
        cluster_root = union_find(alive.size, u, v)
        dup = cluster_root != np.arange(alive.size)
        stage[alive[dup]], root[alive[dup]] = 2, alive[cluster_root[dup]]
    out = work / "dedup"
    out.mkdir(exist_ok=True)
    names = {1: "exact_dedup", 2: "near_dedup"}
    for t, lo, hi in zip(tasks, offsets[:-1], offsets[1:], strict=True):
        decisions = {}
        for i in np.flatnonzero(stage[lo:hi]):
            g = lo + int(i)
            kept_id, kept_source, kept_line = refs[int(root[g])]
            what = "identical to" if stage[g] == 1 else "near duplicate (MinHash LSH) of"
            decisions[int(i)] = [names[int(stage[g])], f"{names[int(stage[g])]}: {what} {kept_source}:{kept_line}",
                                 kept_id]
        write_json(out / f"task-{t.name}.json", decisions)
    summary = {"documents": n, "exact_dedup": int((stage == 1).sum()), "near_dedup": int((stage == 2).sum())}
    write_json(out / "done.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------------------
# Phase 3: write one task's output shards


def write_task(task: Task, work: Path, output: Path, bias: BiasConfig | None = None) -> dict[str, Any]:
    """Write kept documents, removal records and rejects of one task, counting the kept documents' mentions of
    demographic groups (`bias`); `written.json` marks it done."""
    bias = bias or BiasConfig()
    mentions: dict[str, dict[str, dict[str, dict[str, int]]]] = {"domains": {}, "sources": {}}
    tdir = work / f"task-{task.name}"
    decisions = {int(k): v for k, v in json.loads((work / "dedup" / f"task-{task.name}.json").read_text()).items()}
    sources: dict[str, Counter[str]] = {}
    domains: dict[str, Counter[str]] = {}
    kept_labels: dict[str, dict[str, Counter[str]]] = {}  # source -> domains and licences of its kept documents
    removed: Counter[str] = Counter()
    reasons: dict[str, Counter[str]] = {}
    shard = output / "documents" / f"shard-{task.name}.jsonl"
    with JsonlWriter(shard) as docs, JsonlWriter(output / "removed" / f"shard-{task.name}.jsonl") as rem:
        for record in _read_jsonl(tdir / "removed.jsonl"):
            rem.write(record)
        for i, record in enumerate(_read_jsonl(tdir / "docs.jsonl")):
            if i in decisions:
                stage, reason, kept_id = decisions[i]
                rem.write({"id": record["id"], "stage": stage, "reason": reason, "source": record["source"],
                           "line": record["line"], "duplicate_of": kept_id})
                sources.setdefault(record["source"], Counter())["removed"] += 1
                removed[stage] += 1
                reasons.setdefault(stage, Counter())[reason_kind(reason)] += 1
            else:
                docs.write(record)
                sources.setdefault(record["source"], Counter())["kept"] += 1
                text = record["text"] if "text" in record else render(conversation(record))
                domains.setdefault(record["domain"], Counter()).update(docs=1, chars=len(text))
                if bias.enabled:
                    found = count_mentions(text, bias)
                    add(mentions["domains"].setdefault(record["domain"], {}), found)
                    add(mentions["sources"].setdefault(record["source"], {}), found)
                labels = kept_labels.setdefault(record["source"], {"domains": Counter(), "licenses": Counter()})
                labels["domains"][record["domain"]] += 1
                labels["licenses"][record["license"]] += 1
    shutil.copyfile(tdir / "rejects.jsonl", output / "rejects" / f".shard-{task.name}.jsonl.tmp")
    os.replace(output / "rejects" / f".shard-{task.name}.jsonl.tmp", output / "rejects" / f"shard-{task.name}.jsonl")
    written = {
        "task": task.index, "file": str(shard.relative_to(output)), "docs": docs.count,
        "bytes": shard.stat().st_size, "sources": {s: dict(c) for s, c in sources.items()},
        "removed": dict(removed), "reasons": {s: dict(c) for s, c in reasons.items()},
        "domains": {d: dict(c) for d, c in domains.items()},
        "kept_labels": {s: {k: dict(c) for k, c in v.items()} for s, v in kept_labels.items()},
        "mentions": mentions,
    }
    write_json(tdir / "written.json", written)
    return written


# ---------------------------------------------------------------------------------------------------------
# Driver


def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's RANK/WORLD_SIZE or Slurm's SLURM_PROCID/SLURM_NTASKS; (0, 1) alone."""
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and world_var in os.environ:
            rank, world = int(os.environ[rank_var]), int(os.environ[world_var])
            if not 0 <= rank < world:
                raise ValueError(f"{rank_var}={rank} is not in [0, {world_var}={world})")
            return rank, world
    return 0, 1


def make_tasks(files: list[InputFile], task_bytes: int) -> list[Task]:
    """Group consecutive input files into tasks of about `task_bytes` (a file is never split)."""
    tasks: list[Task] = []
    current: list[InputFile] = []
    size = 0
    for f in files:
        fsize = f.size()
        if current and size + fsize > task_bytes:
            tasks.append(Task(len(tasks), current))
            current, size = [], 0
        current.append(f)
        size += fsize
    if current:
        tasks.append(Task(len(tasks), current))
    return tasks


def _fingerprint(config: CurateConfig, files: list[InputFile]) -> str:
    """Hash of the configuration (minus settings that do not change results) and of every input's identity."""
    settings = asdict(config)
    for volatile in ("workers", "keep_work", "barrier_timeout_s", "poll_s"):
        settings.pop(volatile)
    inputs = []
    for f in files:
        stat = f.path.stat()
        inputs.append([f.source, f.size(), stat.st_mtime_ns])
    blob = json.dumps({"config": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _wait_for(paths: list[Path], what: str, config: CurateConfig, finished: Path | None = None) -> None:
    """Barrier on a shared filesystem: wait until every path exists (or `finished` does: the whole run is done
    and rank 0 may already have removed the intermediate files)."""
    deadline = time.time() + config.barrier_timeout_s
    missing = [p for p in paths if not p.exists()]
    while missing and not (finished is not None and finished.exists()):
        if time.time() > deadline:
            raise TimeoutError(f"gave up waiting for {what}: {len(missing)} missing, e.g. {missing[0]}")
        time.sleep(config.poll_s)
        missing = [p for p in missing if not p.exists()]


def _run_parallel(fn: Callable[..., dict[str, Any]], tasks: list[Task], workers: int, desc: str,
                  metrics: Path, rank: int, initargs: tuple[Any, ...] = (), **kwargs: Any) -> None:
    """Run `fn(task, **kwargs)` for every task on a pool of `workers` processes (in this process if 1)."""
    if not tasks:
        return
    bar = tqdm(total=len(tasks), desc=desc, unit="task", file=sys.stderr, disable=None)

    def done(task: Task, result: dict[str, Any]) -> None:
        bar.update(1)
        row = {"rank": rank, "phase": desc, "task": task.index}
        if "records" in result:
            row.update(records=result["records"], seconds=result["seconds"],
                       records_per_s=round(result["records"] / max(result["seconds"], 1e-9), 1))
        _append_metrics(metrics, row)

    if workers <= 1:
        if initargs:
            _init_worker(*initargs)
        for t in tasks:
            done(t, fn(t, **kwargs))
    else:
        # spawn, not fork: workers start clean even if the parent holds threads (torch, tokenizers)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=initargs or (None,)) as pool:
            futures = {pool.submit(fn, t, **kwargs): t for t in tasks}
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
    bar.close()


def _prepare_output(output: Path, fingerprint: str, rank: int, config: CurateConfig) -> dict[str, Any] | None:
    """Create or reopen the output directory. Returns the existing manifest if this exact run already finished."""
    run_file = output / "work" / "run.json"
    manifest_file = output / "manifest.json"
    if manifest_file.exists():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("fingerprint") == fingerprint:
            return manifest
        raise ValueError(f"{output} holds a finished curation of other inputs or settings; choose another --output")
    if rank == 0:
        if run_file.exists():
            if json.loads(run_file.read_text())["fingerprint"] != fingerprint:
                raise ValueError(f"{output} holds an unfinished curation of other inputs or settings; delete "
                                 f"it or choose another --output")
        else:
            if output.exists() and any(output.iterdir()):
                raise ValueError(f"{output} exists and is not empty; choose another --output")
            (output / "work").mkdir(parents=True, exist_ok=True)
            write_json(run_file, {"fingerprint": fingerprint})
    else:
        _wait_for([run_file], "rank 0 to create the output directory", config)
        if json.loads(run_file.read_text())["fingerprint"] != fingerprint:
            raise ValueError(f"rank {rank}: inputs or settings differ from rank 0's")
    for sub in ("documents", "removed", "rejects"):
        (output / sub).mkdir(parents=True, exist_ok=True)
    return None


def curate(inputs: Iterable[str | Path], output: str | Path, config: CurateConfig | None = None,
           command: str = "") -> dict[str, Any]:
    """Curate `inputs` into `output`; returns the manifest. Safe to rerun: finished work is reused."""
    config = config or CurateConfig()
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise ValueError("no input paths given")
    if config.workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = every core), got {config.workers}")
    output = Path(output)
    rank, world = dist_env()
    files, skipped = discover(inputs, config.input)  # raises before any work on a bad input
    for path in skipped:
        print(f"curate: skipping {path}: not an input format", file=sys.stderr)
    tasks = make_tasks(files, config.task_bytes)
    fingerprint = _fingerprint(config, files)
    finished = _prepare_output(output, fingerprint, rank, config)
    if finished is not None:
        print(f"curate: {output} is already complete", file=sys.stderr)
        return finished
    work = output / "work"
    metrics = output / "metrics.jsonl"
    mine = tasks[rank::world]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(config.workers or cpus, len(mine) or 1))

    todo = [t for t in mine if not (work / f"task-{t.name}" / "stats.json").exists()]
    if len(todo) < len(mine):
        print(f"curate: resuming, {len(mine) - len(todo)} of {len(mine)} tasks already filtered", file=sys.stderr)
    if todo:
        index = load_index(config.decontam) if config.decontam.enabled else None
        _run_parallel(filter_task, todo, workers, "filter", metrics, rank, initargs=(index,), config=config,
                      work=work)
    manifest_file = output / "manifest.json"
    _wait_for([work / f"task-{t.name}" / "stats.json" for t in tasks], "all ranks to finish filtering", config,
              manifest_file)

    done_file = work / "dedup" / "done.json"
    if rank == 0 and not done_file.exists() and not manifest_file.exists():
        start = time.time()
        summary = global_dedup(tasks, config.dedup, work)
        _append_metrics(metrics, {"rank": rank, "phase": "dedup", "seconds": round(time.time() - start, 3),
                                  **summary})
    _wait_for([done_file], "rank 0 to finish the global dedup", config, manifest_file)

    todo = [t for t in mine if not (work / f"task-{t.name}" / "written.json").exists()]
    if manifest_file.exists():  # another rank finished the run while this one waited
        todo = []
    _run_parallel(write_task, todo, workers, "write", metrics, rank, work=work, output=output, bias=config.bias)
    _wait_for([work / f"task-{t.name}" / "written.json" for t in tasks], "all ranks to write their shards", config,
              manifest_file)
    if rank != 0:
        _wait_for([manifest_file], "rank 0 to write the manifest", config)
        return json.loads(manifest_file.read_text())

    stats = [json.loads((work / f"task-{t.name}" / "stats.json").read_text()) for t in tasks]
    written = [json.loads((work / f"task-{t.name}" / "written.json").read_text()) for t in tasks]
    input_entries = [{"source": f.source, "kind": f.kind, "tag": f.tag, "default_domain": f.domain,
                      "default_license": f.license} for f in files]
    manifest = build_manifest(
        inputs=input_entries, task_stats=stats, written=written, skipped_files=skipped,
        stage_enabled=config.stage_enabled(), targets=config.mix.targets,
        config=json.loads(json.dumps(asdict(config))),  # as it reads back from manifest.json (lists, not tuples)
        fingerprint=fingerprint, bias=config.bias,
    )
    command = command or f"nanoseek data curate --input {' '.join(inputs)} --output {output}"
    card = output / "data_card.md"
    card.with_name(".data_card.md.tmp").write_text(data_card(manifest, command))
    os.replace(card.with_name(".data_card.md.tmp"), card)
    for sub in ("documents", "removed", "rejects"):  # temporary files of attempts that were interrupted
        for stale in (output / sub).glob(".*.tmp*"):
            stale.unlink()
    write_json(manifest_file, manifest)  # last: its presence means the run is complete
    if not config.keep_work:
        shutil.rmtree(work)
    return manifest
