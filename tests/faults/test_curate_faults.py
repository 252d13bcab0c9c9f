"""Curation faults from issue 13: no input line is ever lost, whatever the reader meets.

Each test reproduces one row of the issue's probe table (a deeply nested line, tasks with nothing left, a truncated
.zst, an unreadable directory, `--workers 0`), and a property test feeds random JSONL to the whole pipeline and
checks that every input line comes out exactly once: kept, removed by a stage, or rejected with a reason.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek.cli import main as nanoseek_main
from nanoseek.data.curate import CurateConfig, curate
from nanoseek.data.curate.manifest import OTHER_REASONS, REJECT_REASONS_SHOWN, reason_kind
from nanoseek.data.sources import Document, InputConfig, Reject, discover, read
from tests.data.test_curate import EVAL_QUESTION, make_doc


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory) -> Path:
    """A planted eval set: the built-in one takes seconds to index, and an empty index would skip the n-gram
    lookup that crashed on a batch without documents."""
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text(json.dumps({"question": EVAL_QUESTION}) + "\n")
    return path


def fast_cli(eval_set: Path) -> list[str]:
    """The command-line form of `fast_config`."""
    return ["--workers", "1", "--set", "toxicity.enabled=false", "--set", "decontam.builtin=false",
            "--set", f"decontam.paths=[{str(eval_set)!r}]"]


def fast_config(eval_set: Path, **input_settings) -> CurateConfig:
    """Every stage but toxicity (whose classifier is retrained per run); the planted eval set only."""
    config = CurateConfig(workers=1, task_bytes=1)  # one task per input file
    config.decontam.builtin = False
    config.decontam.paths = (str(eval_set),)
    config.toxicity.enabled = False
    for key, value in input_settings.items():
        setattr(config.input, key, value)
    return config


def read_all(paths: list[Path]) -> list[Document | Reject]:
    files, _ = discover(paths, InputConfig())
    return [item for f in files for item in read(f, InputConfig())]


def shard_records(out: Path, kind: str) -> list[dict]:
    """The records of one output folder; split on "\\n" only, as JSONL is (text may hold U+2028 and the like)."""
    return [json.loads(line) for f in sorted((out / kind).glob("*.jsonl"))
            for line in f.read_text(encoding="utf-8").split("\n") if line]


def outcome_of_every_line(out: Path) -> Counter[tuple[str, int]]:
    """(file, line) of every kept document, removal and reject in the output shards."""
    lines: Counter[tuple[str, int]] = Counter()
    for record in shard_records(out, "documents") + shard_records(out, "removed"):
        lines[(record["source"], record["line"])] += 1
    for record in shard_records(out, "rejects"):
        lines[(record["file"], record["line"])] += 1
    return lines


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = nanoseek_main(["data", "curate", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------------
# Probe table rows


def nested_file(path: Path) -> None:
    """40 lines; line 18 is a JSON array nested 100,000 deep (json.loads raises RecursionError on it)."""
    lines = [json.dumps({"id": f"d{i}", "text": make_doc(random.Random(i))}) for i in range(1, 41)]
    lines[17] = "[" * 100_000 + "]" * 100_000
    path.write_text("\n".join(lines) + "\n")


def test_deeply_nested_line_is_one_reject_and_the_rest_of_the_file_is_read(tmp_path, eval_set):
    nested_file(tmp_path / "nested.jsonl")
    items = read_all([tmp_path / "nested.jsonl"])
    assert [i.line for i in items] == list(range(1, 41))
    (reject,) = [i for i in items if isinstance(i, Reject)]
    assert reject.line == 18 and reject.reason == "malformed JSON: nested too deeply to parse"

    manifest = curate([tmp_path / "nested.jsonl"], tmp_path / "out", fast_config(eval_set))
    assert manifest["totals"] == {"records": 40, "kept": 39, "removed": 0, "rejected": 1}
    assert manifest["rejects"] == {"total": 1, "reasons": {"malformed JSON: nested too deeply to parse": 1}}
    assert outcome_of_every_line(tmp_path / "out") == Counter({(str(tmp_path / "nested.jsonl"), n): 1
                                                               for n in range(1, 41)})


def test_any_exception_of_one_record_rejects_that_record_only(tmp_path):
    """Exceptions nobody planned for (a 5,000-digit integer makes json.loads raise ValueError) cost one line."""
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join([json.dumps({"text": "first"}), '{"text": "second", "id": ' + "7" * 5000 + "}",
                               json.dumps({"text": "third"})]) + "\n")
    first, odd, third = read_all([path])
    assert isinstance(first, Document) and isinstance(third, Document) and third.line == 3
    assert isinstance(odd, Reject) and odd.line == 2
    assert odd.reason.startswith("unreadable record: ValueError: Exceeds the limit (4300 digits)")
    assert len(odd.reason) < 300  # the exception's message is cut, never the whole record


@pytest.mark.parametrize("content", ["", "not json\n{\n\n", '{"text": "too short"}\n{"text": "also short"}\n'],
                         ids=["empty", "all-garbage", "all-low-quality"])
def test_a_run_with_nothing_left_succeeds_with_an_empty_output(tmp_path, capsys, eval_set, content):
    (tmp_path / "in.jsonl").write_text(content)
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "--input", str(tmp_path / "in.jsonl"), "--output", str(out), *fast_cli(eval_set))
    assert rc == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["totals"]
    assert t["kept"] == 0 and t["records"] == content.count("\n") == t["removed"] + t["rejected"]
    assert manifest["domains"] == {} and manifest["mixing"]["weights"] == {}
    assert manifest["shards"] == [{"file": "documents/shard-00000.jsonl", "docs": 0, "bytes": 0}]
    assert (out / "data_card.md").exists() and f"{t['records']} records -> 0 kept" in stdout


def test_an_empty_task_next_to_full_ones(tmp_path, eval_set):
    """One task (file) with no survivors among tasks with some: the global dedup sees an empty task."""
    rng = random.Random(0)
    docs = [make_doc(rng) for _ in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "b.jsonl").write_text("")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": docs[0]}) + "\n")  # an exact duplicate across tasks
    inputs = [tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl")]
    manifest = curate(inputs, tmp_path / "out", fast_config(eval_set))
    assert manifest["totals"] == {"records": 4, "kept": 3, "removed": 1, "rejected": 0}
    assert manifest["stages"]["exact_dedup"]["removed"] == 1


def zst_of(lines: int) -> bytes:
    data = "".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(lines)).encode()
    return zstandard.ZstdCompressor().compress(data)


def test_truncated_zst_ends_with_a_reject_after_the_records_before_the_cut(tmp_path, eval_set):
    whole = zst_of(2000)
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(whole[: len(whole) // 2])
    items = read_all([path])
    *docs, last = items
    assert len(docs) > 100 and all(isinstance(d, Document) for d in docs)
    assert [i.line for i in items] == list(range(1, len(items) + 1))
    assert isinstance(last, Reject) and "EOFError" in last.reason and "truncated" in last.reason

    manifest = curate([path], tmp_path / "out", fast_config(eval_set))
    assert manifest["totals"]["records"] == len(items) and manifest["totals"]["rejected"] == 1
    (reason,) = manifest["rejects"]["reasons"]
    assert reason.startswith("unreadable from this record on: EOFError")


def test_zst_cut_inside_its_first_block_is_a_reject_not_zero_records(tmp_path):
    whole = zst_of(40)
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(whole[: len(whole) // 2])
    (reject,) = read_all([path])
    assert isinstance(reject, Reject) and reject.line == 1 and "truncated" in reject.reason


def test_zst_of_several_frames_is_read_to_the_end(tmp_path):
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(zst_of(30) + zstandard.ZstdCompressor().compress(b'{"text": "last frame"}\n'))
    items = read_all([path])
    assert len(items) == 31 and all(isinstance(i, Document) for i in items) and items[-1].text == "last frame"


def test_unreadable_directory_under_an_input_is_an_error_naming_it(tmp_path, monkeypatch, capsys, eval_set):
    root = tmp_path / "corpus"
    locked = root / "locked"
    locked.mkdir(parents=True)
    (root / "ok.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (locked / "lost.jsonl").write_text(json.dumps({"text": "never read"}) + "\n")
    real_scandir = os.scandir

    def scandir(path="."):  # what chmod 000 does to anyone but root, who runs the tests in CI
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ValueError, match=f"{locked}: cannot list directory: PermissionError: Permission denied"):
        discover([root], InputConfig())
    rc, _, err = run_cli(capsys, "--input", str(root), "--output", str(tmp_path / "out"), *fast_cli(eval_set))
    assert rc == 2 and "Traceback" not in err and f"{locked}: cannot list directory" in err
    assert not (tmp_path / "out").exists()  # nothing was processed


def test_links_and_special_files_under_an_input_are_errors_not_silence(tmp_path):
    root, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (elsewhere / "more.jsonl").write_text(json.dumps({"text": "behind a link"}) + "\n")
    (root / "ok.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "broken.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    os.mkfifo(root / "pipe.jsonl")
    (root / ".git").mkdir()  # hidden entries are not data and stay quiet
    (root / ".git" / "HEAD.jsonl").write_text("ref")
    with pytest.raises(ValueError) as err:
        discover([root], InputConfig())
    problems = str(err.value).splitlines()[1:]
    assert sorted(p.strip() for p in problems) == [
        f"{root / 'broken.jsonl'}: broken symbolic link",
        f"{root / 'linked'}: symbolic link to a directory is not followed; give its target as an input of its own",
        f"{root / 'pipe.jsonl'}: not a regular file",
    ]


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_curate_refuses_workers_below_one_in_one_line(tmp_path, capsys, workers):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    rc, _, err = run_cli(capsys, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"),
                         "--workers", workers)
    assert rc == 2 and err == f"nanoseek data curate: error: --workers must be at least 1, got {workers}\n"
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="workers must be >= 0"):
        curate([tmp_path / "in.jsonl"], tmp_path / "out", CurateConfig(workers=-1))


def test_cli_errors_are_one_line_naming_the_field(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    for setting, named in (("quality.min_words=many", "min_words"), ("quality.min_wordz=3", "min_wordz")):
        rc, _, err = run_cli(capsys, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"),
                             "--set", setting)
        assert rc == 2 and err.startswith("nanoseek data curate: error: ") and err.count("\n") == 1
        assert named in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# Property: exact accounting of random JSONL


GOOD_DOCS = [make_doc(random.Random(i)) for i in range(4)]  # drawn repeatedly: exact duplicates happen
MAX_CHARS = 2000  # small, so that "enormous" texts stay cheap to generate


def record(text: object) -> bytes:
    return json.dumps({"text": text}).encode()


line_bytes = st.one_of(
    st.sampled_from(GOOD_DOCS).map(record),  # kept, or removed as a duplicate
    st.sampled_from(GOOD_DOCS).map(lambda d: record(d.replace(".", "!", 1))),  # near duplicate
    st.sampled_from(GOOD_DOCS).map(lambda d: record(f"{d} {EVAL_QUESTION}")),  # removed by decontamination
    st.text(max_size=60).map(record),  # unicode of every kind: mostly removed by quality or language
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),  # invalid JSON
    # text of the wrong type (floats include NaN and inf, which json.dumps writes bare)
    st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.lists(st.integers(), max_size=3)).map(record),
    st.dictionaries(st.sampled_from(["id", "body", "domain"]), st.text(max_size=10)).map(
        lambda d: json.dumps(d).encode()),  # no text field
    st.sampled_from([b"", b"   ", b"\r", b"\t"]),  # blank
    st.just(b'{"text": "lone surrogate \\ud800 here"}'),  # JSON that no UTF-8 file can hold
    st.integers(MAX_CHARS + 1, 3 * MAX_CHARS).map(lambda n: record("x" * n)),  # enormous
    st.integers(500, 50_000).map(lambda n: b"[" * n + b"]" * n),  # nested: RecursionError when deep enough
    st.integers(500, 50_000).map(lambda n: b'{"text": "nested", "x": ' + b"[" * n + b"]" * n + b"}"),
    st.integers(4301, 6000).map(lambda n: b'{"text": "big id", "id": ' + b"9" * n + b"}"),  # ValueError
    st.binary(max_size=60),  # binary junk
).map(lambda line: line.replace(b"\n", b""))  # one line each
input_file = st.tuples(st.sampled_from(["", ".gz", ".zst"]), st.lists(line_bytes, max_size=8))


def write_input(path: Path, lines: list[bytes]) -> None:
    data = b"".join(line + b"\n" for line in lines)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(input_file, min_size=1, max_size=3))
def test_every_generated_line_is_kept_removed_or_rejected_exactly_once(eval_set, files):
    with tempfile.TemporaryDirectory() as tmp:
        inputs = []
        for i, (compression, lines) in enumerate(files):
            path = Path(tmp) / f"in{i}.jsonl{compression}"
            write_input(path, lines)
            inputs.append(path)
        out = Path(tmp) / "out"
        manifest = curate(inputs, out, fast_config(eval_set, max_chars=MAX_CHARS))

        expected = Counter({(str(path), n): 1 for path, (_, lines) in zip(inputs, files, strict=True)
                            for n in range(1, len(lines) + 1)})
        assert outcome_of_every_line(out) == expected
        t = manifest["totals"]
        assert t["records"] == sum(len(lines) for _, lines in files) == t["kept"] + t["removed"] + t["rejected"]
        for entry, (_, lines) in zip(manifest["inputs"], files, strict=True):
            assert entry["records"] == len(lines) == entry["kept"] + entry["removed"] + entry["rejected"]
        assert len(shard_records(out, "documents")) == t["kept"] == sum(s["docs"] for s in manifest["shards"])
        assert sum(s["removed"] for s in manifest["stages"].values()) == t["removed"]
        removed_by_stage = Counter(r["stage"] for r in shard_records(out, "removed"))
        assert removed_by_stage == Counter({k: s["removed"] for k, s in manifest["stages"].items() if s["removed"]})
        rejects = Counter(reason_kind(r["reason"]) for r in shard_records(out, "rejects"))
        assert manifest["rejects"]["total"] == t["rejected"] == sum(manifest["rejects"]["reasons"].values())
        if len(rejects) <= REJECT_REASONS_SHOWN:
            assert manifest["rejects"]["reasons"] == dict(rejects)
        else:
            assert OTHER_REASONS in manifest["rejects"]["reasons"]
