"""Input readers: every format, configurable fields, derived ids, and bad input turned into rejects or errors."""

from __future__ import annotations

import gzip
import json

import pytest

from nanoseek.data.sources import Document, InputConfig, Reject, discover, read


def _read_all(paths, config=None):
    config = config or InputConfig()
    files, skipped = discover(paths, config)
    return [item for f in files for item in read(f, config)], skipped


def _write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


RECORDS = [{"id": "a", "text": "first document"}, {"text": "second document", "domain": "math", "license": "MIT"}]


def test_jsonl_plain_gz_zst(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    _write_jsonl(tmp_path / "p.jsonl", RECORDS)
    _write_jsonl(tmp_path / "g.jsonl.gz", RECORDS, gzip.open)
    data = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    (tmp_path / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    for name in ("p.jsonl", "g.jsonl.gz", "z.jsonl.zst"):
        items, _ = _read_all([tmp_path / name])
        assert [type(i) for i in items] == [Document, Document]
        first, second = items
        assert (first.id, first.text, first.line, first.domain, first.license) == \
            ("a", "first document", 1, "general", "unknown")
        src = str(tmp_path / name)
        assert (second.id, second.source, second.domain, second.license) == (f"{src}:2", src, "math", "MIT")


def test_configurable_fields_and_source_defaults(tmp_path):
    _write_jsonl(tmp_path / "c.jsonl", [{"key": 7, "content": "hello there"}])
    config = InputConfig(text_field="content", id_field="key",
                         sources={str(tmp_path / "c.jsonl"): {"domain": "dialogue", "license": "CC0", "tag": "chat"}})
    (doc,), _ = _read_all([str(tmp_path / "c.jsonl")], config)
    assert (doc.id, doc.text, doc.domain, doc.license, doc.tag) == ("7", "hello there", "dialogue", "CC0", "chat")
    with pytest.raises(ValueError, match="not inputs"):
        discover([tmp_path / "c.jsonl"], InputConfig(sources={"elsewhere.jsonl": {}}))


def test_bad_records_become_rejects_with_line_and_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b"{not json",
        b'{"text": "caf\xe9"}',  # Latin-1 byte: invalid UTF-8
        json.dumps({"text": 42}).encode(),
        json.dumps({"title": "no text field"}).encode(),
        json.dumps({"text": "   "}).encode(),
        json.dumps({"text": "x" * 101}).encode(),
        b"",
        json.dumps(["a", "list"]).encode(),
        b'{"text": "lone \\ud800 surrogate"}',
        json.dumps({"text": None}).encode(),
        json.dumps({"text": "good two", "id": 5}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    items, _ = _read_all([path], InputConfig(max_chars=100))
    assert len(items) == len(lines)  # one item per record: nothing is lost silently
    rejects = {i.line: i.reason for i in items if isinstance(i, Reject)}
    assert [i.line for i in items if isinstance(i, Document)] == [1, 12]
    assert "malformed JSON" in rejects[2]
    assert "invalid UTF-8 at byte 13" in rejects[3]
    assert "is int, expected a string" in rejects[4]
    assert "missing or null" in rejects[5] and "missing or null" in rejects[11]
    assert "is empty" in rejects[6]
    assert "101 characters > max_chars=100" in rejects[7]
    assert rejects[8] == "blank line"
    assert "JSON list, expected an object" in rejects[9]
    assert "invalid Unicode" in rejects[10]
    assert all(isinstance(i, Reject) and i.file == str(path) for i in items if i.line not in (1, 12))


def test_truncated_gzip_ends_with_a_reject(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    _write_jsonl(path, [{"text": f"document number {i} " * 20} for i in range(2000)], gzip.open)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut mid-stream
    items, _ = _read_all([path])
    assert isinstance(items[-1], Reject) and "unreadable from this record on" in items[-1].reason
    assert all(isinstance(i, Document) for i in items[:-1]) and items[-1].line == len(items)


def test_text_files_and_directories(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("Plain text one.\nSecond line.")
    (root / "sub" / "b.md").write_text("# Title\nMarkdown body.")
    (root / "sub" / "c.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".hidden.txt").write_text("not data")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    items, skipped = _read_all([root])
    docs = [i for i in items if isinstance(i, Document)]
    assert sorted(d.text for d in docs) == ["# Title\nMarkdown body.", "Plain text one.\nSecond line.", "from jsonl"]
    assert skipped == [str(root / "image.png")]
    (reject,) = [i for i in items if isinstance(i, Reject)]
    assert reject.file.endswith("latin1.txt") and "invalid UTF-8" in reject.reason
    assert all(d.tag == "corpus" for d in docs)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": ["one", None, "three"], "id": ["x", "y", "z"], "other": [1, 2, 3]})
    pq.write_table(table, tmp_path / "t.parquet")
    items, _ = _read_all([tmp_path / "t.parquet"])
    assert [(type(i).__name__, i.line) for i in items] == [("Document", 1), ("Reject", 2), ("Document", 3)]
    assert items[2].id == "z"
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match=r"nocol.parquet.*no column 'text'"):
        discover([tmp_path / "nocol.parquet"], InputConfig())


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["alpha", "beta", ""], "id": ["1", "2", "3"]})
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    items, _ = _read_all([tmp_path / "single"])
    assert [i.text for i in items if isinstance(i, Document)] == ["alpha", "beta"]
    assert isinstance(items[2], Reject) and items[2].line == 3
    items, _ = _read_all([tmp_path / "dict"])
    sources = [i.source if isinstance(i, Document) else i.file for i in items]
    assert sorted(s.rsplit("[", 1)[1] for s in sources) == ["test]", "train]", "train]", "train]"]


def _warc_record(kind: str, uri: str, body: bytes, content_type: str) -> bytes:
    head = (f"WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Record-ID: <urn:uuid:{abs(hash(uri + kind)):032x}>\r\n"
            f"WARC-Target-URI: {uri}\r\nWARC-Date: 2024-01-01T00:00:00Z\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body + b"\r\n\r\n"


def test_warc_and_wet(tmp_path):
    pytest.importorskip("fastwarc")
    pytest.importorskip("resiliparse")
    html = (b"<html><head><title>t</title><script>var x = 1;</script></head><body>"
            b"<p>The river crossing became a market town.</p></body></html>")
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html
    png = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n\x89PNG"
    request = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
    warc = (_warc_record("request", "http://example.com/", request, "application/http; msgtype=request")
            + _warc_record("response", "http://example.com/", http, "application/http; msgtype=response")
            + _warc_record("response", "http://example.com/logo.png", png, "application/http; msgtype=response"))
    with gzip.open(tmp_path / "crawl.warc.gz", "wb") as f:
        f.write(warc)
    items, _ = _read_all([tmp_path / "crawl.warc.gz"])
    doc, reject = items  # the request record is not a document
    assert isinstance(doc, Document) and "The river crossing became a market town." in doc.text
    assert "var x" not in doc.text and doc.meta["url"] == "http://example.com/" and doc.id.startswith("<urn:uuid:")
    assert isinstance(reject, Reject) and "image/png" in reject.reason
    wet = _warc_record("conversion", "http://example.com/", "Plain extracted text, café.".encode(), "text/plain")
    (tmp_path / "crawl.warc.wet").write_bytes(wet)
    (doc,), _ = _read_all([tmp_path / "crawl.warc.wet"])
    assert doc.text == "Plain extracted text, café."


def test_missing_or_unreadable_inputs_fail_before_any_work(tmp_path):
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (tmp_path / "corrupt.jsonl.gz").write_bytes(b"this is not gzip")
    (tmp_path / "data.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError) as err:
        discover([tmp_path / "ok.jsonl", tmp_path / "missing.jsonl", tmp_path / "corrupt.jsonl.gz",
                  tmp_path / "data.bin"], InputConfig())
    message = str(err.value)
    assert "missing.jsonl: input path does not exist" in message
    assert "corrupt.jsonl.gz: cannot read" in message
    assert "data.bin: unknown input format" in message
    assert "ok.jsonl" not in message
    with pytest.raises(ValueError, match="given more than once"):
        discover([tmp_path / "ok.jsonl", tmp_path], InputConfig())
