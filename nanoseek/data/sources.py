"""Read user corpora into one stream of documents: JSONL (plain, .gz, .zst), Parquet, plain-text files,
HF `datasets` saved with `save_to_disk`, and web archives (WARC with HTML-to-text, WET).

Every record read yields exactly one item: a `Document`, or a `Reject` naming the file, the record's line (or row,
or archive record number, 1-based) and the reason, so the curation accounting can prove that nothing was lost.
Whatever goes wrong with one record (even an exception the parser was never expected to raise, such as the
RecursionError of a deeply nested JSON value) rejects that record only; a file that cannot be read on (a truncated
.gz or .zst) ends with one Reject for the rest. Problems with a whole input (a missing path, an unreadable file or
directory, a Parquet file without the text column) are raised by `discover` before any work starts, all of them in
one error.

Optional dependencies are imported only when their format is read: `zstandard` (.zst), `pyarrow` (Parquet),
`datasets` (saved datasets), `fastwarc` + `resiliparse` (web archives).
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
WARC_SUFFIXES = (".warc", ".wet", ".arc")
COMPRESSIONS = ("", ".gz", ".zst")
MAX_ERROR_CHARS = 200  # an exception's message in a reject reason is cut to this: it may quote the record


@dataclass
class Document:
    """One document on its way through curation; provenance travels with the text."""

    id: str  # the record's own id, or "<source>:<line>" when it has none
    text: str
    source: str  # input file, with "[split]" appended for saved datasets
    line: int  # 1-based record number within the source
    domain: str = "general"
    license: str = "unknown"
    tag: str = ""  # name of the input the document came from (set per input in the config)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"url": ...} for web archives
    # a conversation: its fields ("messages"; "prompt", "chosen", "rejected"; or "question", "answer"), each a
    # list of turns {"role", "content"}; `text` is then `render(turns)`, what dedup and decontamination read
    turns: dict[str, list[dict[str, str]]] | None = None
    # a conversation's other fields (task, difficulty, style, a rendered prompt, ...), carried into the curated
    # record so that the trainers still find them; their strings are normalised and redacted like the turns
    fields: dict[str, Any] = field(default_factory=dict)
    plain: tuple[str, ...] = ()  # the conversation fields that came as plain strings, and are written back so

    def body(self) -> dict[str, Any]:
        """What the curated record holds of this document: its text, or its conversation in the shape it came in
        (lists of turns, or plain strings) with its other fields."""
        if self.turns is None:
            return {"text": self.text}
        shaped = {f: turns[0]["content"] if f in self.plain else turns for f, turns in self.turns.items()}
        return {**shaped, **self.fields}

    def judged(self) -> str:
        """The text that quality and toxicity judge: a conversation's assistant turns (what training imitates),
        otherwise the whole text."""
        if self.turns is None:
            return self.text
        return "\n\n".join(t["content"] for turns in self.turns.values() for t in turns
                            if t["role"] == "assistant")

    def map_turns(self, fn: Callable[[str], str]) -> None:
        """Apply `fn` to the text, or to every turn of a conversation and every string of its other fields (a
        PII redaction must not survive in a copy of the question), then re-render the text."""
        if self.turns is None:
            self.text = fn(self.text)
            return
        for turns in self.turns.values():
            for t in turns:
                t["content"] = fn(t["content"])
        self.fields = _map_strings(self.fields, fn)
        self.text = render(self.turns)


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """`value` with `fn` applied to every string inside it (lists and objects walked; keys kept)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    return value


# chat (SFT), preference (DPO) and problem (RL: a question and its gold answer) records
CONVERSATION_FIELDS = (("messages",), ("prompt", "chosen", "rejected"), ("question", "answer"))
USER_FIELDS = ("prompt", "question")  # a string in one of these is a user turn; in the others an assistant turn
# what curation writes into every curated record; a conversation's own fields of these names give way to them
PROVENANCE = ("id", "source", "line", "domain", "license", "tag", "content_hash", "meta")
ROLES = ("system", "user", "assistant")


def render(turns: dict[str, list[dict[str, str]]]) -> str:
    """A conversation as one text (every turn of every field, in order): what dedup and decontamination see."""
    return "\n\n".join(t["content"] for field_turns in turns.values() for t in field_turns)


def conversation(record: dict[str, Any]) -> dict[str, list[dict[str, str]]] | str | None:
    """The turns of a chat record ({"messages": [...]}), a preference record ({"prompt", "chosen", "rejected"};
    TRL's conversational lists, or plain strings: a user prompt and assistant replies) or a problem record
    ({"question", "answer"} strings, as rl.jsonl and GSM8K hold them); None when the record is none of these; a
    string saying what is wrong when it is one of them, malformed."""
    for fields in CONVERSATION_FIELDS:
        if not all(f in record for f in fields):
            continue
        out = {}
        for f in fields:
            value = record[f]
            if isinstance(value, str):
                value = [{"role": "user" if f in USER_FIELDS else "assistant", "content": value}]
            if not isinstance(value, list) or not value:
                return f"field {f!r} must be a non-empty list of turns or a string"
            turns = []
            for i, t in enumerate(value):
                if not (isinstance(t, dict) and t.get("role") in ROLES and isinstance(t.get("content"), str)):
                    return f"field {f!r} turn {i}: expected {{\"role\": system|user|assistant, \"content\": string}}"
                turns.append({"role": t["role"], "content": t["content"]})
            out[f] = turns
        return out
    return None


@dataclass
class Reject:
    """An input record that could not be read as a document."""

    file: str
    line: int
    reason: str


@dataclass
class InputConfig:
    """How records are read. `sources` maps an input path (as given on the command line) to defaults for the
    documents read from it: {"domain": ..., "license": ..., "tag": ...}; a record's own fields win."""

    text_field: str = "text"
    id_field: str = "id"
    domain_field: str = "domain"
    license_field: str = "license"
    domain: str = "general"
    license: str = "unknown"
    max_chars: int = 1_000_000  # longer documents are rejected as enormous (Gopher keeps <= 100k words)
    html_main_content: bool = True  # WARC: keep only main-content HTML elements (drops navigation, footers)
    sources: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class InputFile:
    """One readable unit of input with the provenance defaults of the input path it was found under."""

    path: Path
    kind: str  # "jsonl" | "parquet" | "text" | "hf" | "warc"
    domain: str
    license: str
    tag: str
    split: str | None = None  # saved DatasetDict split

    @property
    def source(self) -> str:
        return f"{self.path}[{self.split}]" if self.split else str(self.path)

    def size(self) -> int:
        """Bytes on disk, used to balance work across processes."""
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return self.path.stat().st_size


def file_kind(path: Path) -> str | None:
    """Format of a file from its name, or None when it is not an input format."""
    name = path.name.lower()
    for comp in COMPRESSIONS:
        if any(name.endswith(s + comp) for s in JSONL_SUFFIXES):
            return "jsonl"
        if any(name.endswith(s + comp) for s in TEXT_SUFFIXES):
            return "text"
    if any(name.endswith(s + comp) for s in WARC_SUFFIXES for comp in ("", ".gz")):  # what fastwarc reads
        return "warc"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def discover(inputs: Sequence[str | Path], config: InputConfig, require_text: bool = True
             ) -> tuple[list[InputFile], list[str]]:
    """Expand input paths into readable files, checking each one before any work starts.

    Returns (files in a stable order, files skipped inside directories because their format is unknown).
    Raises one error listing every missing, unreadable or malformed input, including tables (Parquet, saved
    datasets) without the text column unless `require_text` is False.
    """
    unknown = sorted(set(config.sources) - {str(p) for p in inputs})
    if unknown:
        raise ValueError(f"config `sources` names paths that are not inputs: {unknown}")
    files: list[InputFile] = []
    skipped: list[str] = []
    problems: list[str] = []
    seen: dict[tuple[Path, str | None], str] = {}  # resolved path -> the input it was first found under
    for raw in inputs:
        root = Path(raw)
        spec = config.sources.get(str(raw), {})
        bad = sorted(set(spec) - {"domain", "license", "tag"})
        if bad:
            problems.append(f"{raw}: unknown source setting(s) {bad} (known: domain, license, tag)")
        defaults = dict(
            domain=spec.get("domain", config.domain),
            license=spec.get("license", config.license),
            tag=spec.get("tag", root.name or str(root)),
        )
        if not root.exists():
            problems.append(f"{raw}: input path does not exist")
            continue
        if root.is_dir() and is_saved_dataset(root):
            found = [InputFile(root, "hf", **defaults)]
        elif root.is_dir():
            found = []
            paths, unreadable = _walk(root)
            problems.extend(unreadable)
            for p in paths:
                kind = file_kind(p)
                if kind is None:
                    skipped.append(str(p))
                else:
                    found.append(InputFile(p, kind, **defaults))
            if not found:
                problems.append(f"{raw}: directory holds no input files (JSONL, Parquet, text, WARC)")
        else:
            kind = file_kind(root)
            if kind is None:
                problems.append(
                    f"{raw}: unknown input format (expected .jsonl/.ndjson[.gz|.zst], .parquet, "
                    f".txt/.md[.gz|.zst], .warc/.wet[.gz], or a saved `datasets` directory)"
                )
                continue
            found = [InputFile(root, kind, **defaults)]
        for f in found:
            key = (f.path.resolve(), f.split)
            if key in seen:
                problems.append(f"{f.path}: given more than once (also as {seen[key]})")
                continue
            seen[key] = str(raw)
            try:
                files.extend(_check(f, config, require_text))
            except Exception as e:  # noqa: BLE001 - every failure becomes one line of the report below
                problems.append(f"{f.path}: cannot read: {type(e).__name__}: {e}")
    if problems:
        raise ValueError("bad input(s), nothing was processed:\n  " + "\n  ".join(problems))
    return files, skipped


def _walk(root: Path) -> tuple[list[Path], list[str]]:
    """The regular files under a directory, sorted, and a problem for every other entry: a directory that cannot
    be listed, a symbolic link to a directory (not followed: it may loop), a broken link, a pipe, a socket. Nothing
    under an input directory is passed over without a word, except hidden entries (.git, .DS_Store): not data."""
    problems: list[str] = []
    files: list[Path] = []

    def unlistable(error: OSError) -> None:
        problems.append(f"{error.filename}: cannot list directory: {type(error).__name__}: {error.strerror}")

    for top, dirs, names in os.walk(root, onerror=unlistable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for d in dirs:
            if os.path.islink(os.path.join(top, d)):
                problems.append(f"{os.path.join(top, d)}: symbolic link to a directory is not followed; "
                                f"give its target as an input of its own")
        for name in names:
            path = Path(top, name)
            if name.startswith("."):
                continue
            if path.is_file():
                files.append(path)
            elif path.is_symlink() and not path.exists():
                problems.append(f"{path}: broken symbolic link")
            else:
                problems.append(f"{path}: not a regular file")
    return sorted(files), problems


def _check(f: InputFile, config: InputConfig, require_text: bool) -> list[InputFile]:
    """Open an input far enough to know it is readable; expand saved DatasetDicts into one file per split."""
    if f.kind == "hf":
        dataset = _load_dataset(f.path)
        splits = dataset if hasattr(dataset, "keys") else {None: dataset}
        out = []
        for split, ds in splits.items():
            if require_text and config.text_field not in ds.column_names:
                where = f" split {split!r}" if split else ""
                raise ValueError(f"dataset{where} has no column {config.text_field!r} (columns: {ds.column_names})")
            out.append(InputFile(f.path, "hf", f.domain, f.license, f.tag, split=split))
        return out
    if f.kind == "parquet":
        schema = _parquet(f.path).schema_arrow
        if require_text and config.text_field not in schema.names:
            raise ValueError(f"no column {config.text_field!r} (columns: {schema.names})")
        return [f]
    if f.kind == "warc":
        _warc_modules()
    with _open_binary(f.path) as stream:
        try:
            stream.read(1)  # decompresses the first block: a corrupt header fails here
        except EOFError:
            pass  # truncated inside its first block: `read` rejects it with that reason
    return [f]


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(ZstdFrames(path))
    return open(path, "rb")


class ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every frame of a .zst file, raising EOFError when the file ends inside a frame
    (as gzip does). zstandard's own stream reader ends quietly there, so a truncated file would read as a shorter
    complete one -- or as an empty one when it is cut inside its first block."""

    CHUNK = 1 << 12  # compressed bytes per step: bounds one step's output (zstd expands at most ~32,000x)

    def __init__(self, path: Path) -> None:
        try:
            import zstandard
        except ImportError as e:
            raise ImportError("reading .zst needs `zstandard`: pip install 'nanoseek[data]'") from e
        self._zstd = zstandard.ZstdDecompressor()
        self._file = open(path, "rb")
        self._frame: Any = None  # decompressor of the frame being read; None between frames
        self._out = b""  # decompressed bytes not yet returned, from self._pos on
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos == len(self._out):
            chunk = self._file.read(self.CHUNK)
            if not chunk:
                if self._frame is not None:
                    raise EOFError("compressed file ended before the end of its last zstd frame (truncated?)")
                return 0
            self._out, self._pos = self._decompress(chunk), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        """Feed compressed bytes through as many frames as they reach into."""
        out = []
        while chunk:
            if self._frame is None:
                self._frame = self._zstd.decompressobj()
            out.append(self._frame.decompress(chunk))
            chunk = b""
            if self._frame.eof:  # what is left of the chunk starts the next frame
                chunk, self._frame = self._frame.unused_data, None
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _parquet(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet needs `pyarrow`: pip install 'nanoseek[data]'") from e
    return pq.ParquetFile(path)


def _load_dataset(path: Path) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("reading saved datasets needs `datasets`: pip install 'nanoseek[data]'") from e
    return datasets.load_from_disk(str(path))


def _warc_modules() -> Any:
    try:
        from fastwarc import warc
        from resiliparse.extract import html2text
        from resiliparse.parse import encoding
    except ImportError as e:
        raise ImportError("reading web archives needs `fastwarc` and `resiliparse`: pip install 'nanoseek[web]'") from e
    return warc, html2text, encoding


def read(f: InputFile, config: InputConfig) -> Iterator[Document | Reject]:
    """Every record of one input file, as a Document or a Reject. A file that fails part-way (a truncated .gz or
    .zst, a corrupt Parquet page) ends with a Reject naming the first record that could not be read."""
    readers = {"jsonl": _read_jsonl, "text": _read_text, "parquet": _read_parquet, "hf": _read_hf, "warc": _read_warc}
    last = 0
    try:
        for item in readers[f.kind](f, config):
            last = item.line
            yield item
    except Exception as e:  # noqa: BLE001 - any failure of the rest of the file is recorded, not fatal to the run
        yield Reject(f.source, last + 1, f"unreadable from this record on: {_describe(e)}")


def _describe(error: BaseException) -> str:
    """An exception as one short line for a reject reason."""
    text = " ".join(str(error).split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + "…"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _guarded(f: InputFile, line: int, build: Callable[[], Document | Reject]) -> Document | Reject:
    """`build()` for one record, or a Reject of that record when it raises: a record the parser chokes on in an
    unforeseen way (RecursionError on deep nesting, ValueError on a 5,000-digit integer) must cost that record
    only, never the rest of the file."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 - whatever one record raises becomes that record's reject
        return Reject(f.source, line, f"unreadable record: {_describe(e)}")


def _make(f: InputFile, config: InputConfig, line: int, text: Any, rid: Any = None, domain: Any = None,
          license: Any = None, meta: dict[str, Any] | None = None) -> Document | Reject:
    """Validate one record's fields; the single place where bad records become Rejects."""
    name = config.text_field
    if text is None:
        return Reject(f.source, line, f"field {name!r} is missing or null")
    if not isinstance(text, str):
        return Reject(f.source, line, f"field {name!r} is {type(text).__name__}, expected a string")
    if not text.strip():
        return Reject(f.source, line, f"field {name!r} is empty")
    if len(text) > config.max_chars:
        return Reject(f.source, line, f"field {name!r} has {len(text):,} characters > max_chars={config.max_chars:,}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON escapes can smuggle in lone surrogates that no file can store
        return Reject(f.source, line, f"field {name!r} has invalid Unicode at character {e.start} ({e.reason})")
    doc_id = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) else None
    return Document(
        id=doc_id if doc_id is not None else f"{f.source}:{line}",
        text=text,
        source=f.source,
        line=line,
        domain=domain if isinstance(domain, str) and domain else f.domain,
        license=license if isinstance(license, str) and license else f.license,
        tag=f.tag,
        meta=meta or {},
    )


def _read_jsonl(f: InputFile, config: InputConfig) -> Iterator[Document | Reject]:
    with _open_binary(f.path) as stream:
        for line_no, raw in enumerate(stream, start=1):
            yield _guarded(f, line_no, functools.partial(_jsonl_record, f, config, line_no, raw))


def _jsonl_record(f: InputFile, config: InputConfig, line_no: int, raw: bytes) -> Document | Reject:
    raw = raw.rstrip(b"\r\n")
    if not raw.strip():
        return Reject(f.source, line_no, "blank line")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Reject(f.source, line_no, f"invalid UTF-8 at byte {e.start}")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return Reject(f.source, line_no, f"malformed JSON: {e.msg} at column {e.colno}")
    except RecursionError:
        return Reject(f.source, line_no, "malformed JSON: nested too deeply to parse")
    if not isinstance(record, dict):
        return Reject(f.source, line_no, f"record is a JSON {type(record).__name__}, expected an object")
    turns = conversation(record) if config.text_field not in record else None
    if isinstance(turns, str):
        return Reject(f.source, line_no, turns)
    if turns is not None:  # a conversation: its domain is "dialogue" unless the record or the input says otherwise
        domain = record.get(config.domain_field) or (f.domain if f.domain != config.domain else "dialogue")
        doc = _make(f, config, line_no, render(turns), record.get(config.id_field), domain,
                    record.get(config.license_field))
        if isinstance(doc, Document):
            doc.turns = turns
            named = {*turns, config.id_field, config.domain_field, config.license_field, *PROVENANCE}
            doc.fields = {k: v for k, v in record.items() if k not in named}
            doc.plain = tuple(f for f in turns if isinstance(record[f], str))
        return doc
    return _make(f, config, line_no, record.get(config.text_field), record.get(config.id_field),
                 record.get(config.domain_field), record.get(config.license_field))


def _read_text(f: InputFile, config: InputConfig) -> Iterator[Document | Reject]:
    """A plain-text file is one document."""
    with _open_binary(f.path) as stream:
        raw = stream.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        yield Reject(f.source, 1, f"invalid UTF-8 at byte {e.start}")
        return
    yield _guarded(f, 1, functools.partial(_make, f, config, 1, text))


def _columns(config: InputConfig, available: Sequence[str]) -> list[str]:
    wanted = [config.text_field, config.id_field, config.domain_field, config.license_field]
    return [c for c in dict.fromkeys(wanted) if c in available]


def _read_batches(f: InputFile, config: InputConfig, batches: Iterator[dict[str, list[Any]]]
                  ) -> Iterator[Document | Reject]:
    row = 0
    for batch in batches:
        n = len(batch[config.text_field])
        empty = [None] * n
        ids = batch.get(config.id_field, empty)
        domains = batch.get(config.domain_field, empty)
        licenses = batch.get(config.license_field, empty)
        for i, text in enumerate(batch[config.text_field]):
            row += 1
            yield _guarded(f, row, functools.partial(_make, f, config, row, text, ids[i], domains[i], licenses[i]))


def _read_parquet(f: InputFile, config: InputConfig) -> Iterator[Document | Reject]:
    pf = _parquet(f.path)
    columns = _columns(config, pf.schema_arrow.names)
    batches = (b.to_pydict() for b in pf.iter_batches(batch_size=1024, columns=columns))
    yield from _read_batches(f, config, batches)


def _read_hf(f: InputFile, config: InputConfig) -> Iterator[Document | Reject]:
    dataset = _load_dataset(f.path)
    ds = dataset[f.split] if f.split is not None else dataset
    ds = ds.select_columns(_columns(config, ds.column_names))
    yield from _read_batches(f, config, ds.iter(batch_size=1024))


def _read_warc(f: InputFile, config: InputConfig) -> Iterator[Document | Reject]:
    """HTML responses are converted to text by resiliparse; WET conversion records already hold text.
    Only response and conversion records are documents (request, metadata and warcinfo records are not)."""
    warc, html2text, encoding = _warc_modules()
    kinds = warc.WarcRecordType.response | warc.WarcRecordType.conversion
    with open(f.path, "rb") as stream:
        for number, record in enumerate(warc.ArchiveIterator(stream, record_types=kinds, parse_http=True), 1):
            yield _guarded(f, number, functools.partial(_warc_record, f, config, number, record))


def _warc_record(f: InputFile, config: InputConfig, number: int, record: Any) -> Document | Reject:
    warc, html2text, encoding = _warc_modules()
    rid = record.record_id
    meta = {"url": record.headers.get("WARC-Target-URI", "")}
    body = record.reader.read()
    if record.record_type == warc.WarcRecordType.conversion:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            return Reject(f.source, number, f"invalid UTF-8 at byte {e.start} in WET record {rid}")
    else:
        content_type = (record.http_content_type or "").lower()
        if "html" not in content_type:
            return Reject(f.source, number, f"response {rid} has content type {content_type!r}, not HTML")
        html = encoding.bytes_to_str(body, encoding.detect_encoding(body))
        text = html2text.extract_plain_text(html, main_content=config.html_main_content)
    return _make(f, config, number, text, rid, meta=meta)


def columns(f: InputFile) -> list[str] | None:
    """Column names of a table input (Parquet, saved dataset); None for formats without a schema."""
    if f.kind == "parquet":
        return list(_parquet(f.path).schema_arrow.names)
    if f.kind == "hf":
        dataset = _load_dataset(f.path)
        return list((dataset[f.split] if f.split is not None else dataset).column_names)
    return None
