"""The feedback store: what the server answered, what people thought of it, and which answers the verification
loop was unsure of, in one SQLite file — the raw material of the next training round.

    completions  every answer the server gave (conversation, raw completion with its reasoning tags)
    feedback     thumbs up/down + comment on a completion this server gave (verified) or on a conversation a
                 client sends along (unverified: exported only with --include-unverified), automatic
                 "low_confidence" entries from the verification loop, and moderation events

`nanoseek feedback export --db FILE --out DIR` writes
    sft.jsonl         conversations with a thumbs-up answer:   {"messages": [..., assistant]}
    preference.jsonl  liked vs disliked answers to one prompt: {"prompt": [...], "chosen": [...], "rejected": [...]}
    review.jsonl      low-confidence and disliked answers for a person (or a stronger model) to correct
in the formats `nanoseek sft` / `nanoseek dpo` (and TRL) read.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from nanoseek.common import write_jsonl

SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    id TEXT, choice INTEGER, created REAL, model TEXT, messages TEXT, completion TEXT,
    PRIMARY KEY (id, choice));
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL, kind TEXT, rating INTEGER, comment TEXT,
    messages TEXT, completion TEXT, completion_id TEXT, meta TEXT);
"""


class FeedbackStore:
    """Thread-safe (one connection behind a lock; writes are tiny)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.lock = threading.Lock()
        with self.lock, self.db:
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def add_completion(self, completion_id: str, choice: int, model: str, messages: list[dict],
                       completion: str) -> None:
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?, ?)",
                            (completion_id, choice, time.time(), model, json.dumps(messages), completion))

    def completion(self, completion_id: str, choice: int) -> tuple[list[dict], str] | None:
        with self.lock:
            row = self.db.execute("SELECT messages, completion FROM completions WHERE id = ? AND choice = ?",
                                  (completion_id, choice)).fetchone()
        return None if row is None else (json.loads(row[0]), row[1])

    def add_feedback(self, kind: str, messages: list[dict], completion: str, rating: int | None = None,
                     comment: str = "", completion_id: str | None = None, meta: dict | None = None) -> int:
        with self.lock, self.db:
            cur = self.db.execute(
                "INSERT INTO feedback (created, kind, rating, comment, messages, completion, completion_id, meta) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), kind, rating, comment, json.dumps(messages), completion, completion_id,
                 json.dumps(meta or {})))
            return int(cur.lastrowid)

    def feedback(self) -> list[dict]:
        with self.lock:
            rows = self.db.execute("SELECT id, created, kind, rating, comment, messages, completion, completion_id, "
                                   "meta FROM feedback ORDER BY id").fetchall()
        keys = ("id", "created", "kind", "rating", "comment", "messages", "completion", "completion_id", "meta")
        out = []
        for row in rows:
            d = dict(zip(keys, row, strict=True))
            d["messages"], d["meta"] = json.loads(d["messages"]), json.loads(d["meta"])
            out.append(d)
        return out


def verified(row: dict) -> bool:
    """A rating of an answer this server gave (by its completion_id). Ratings of conversations a client sent
    along are unverified: anyone could send any "answer" with a thumbs-up."""
    return bool(row["meta"].get("verified", row["completion_id"] is not None))


def export(db: str | Path, out_dir: str | Path, include_unverified: bool = False) -> dict[str, int]:
    """Write sft.jsonl, preference.jsonl and review.jsonl (see the module docstring); returns record counts.
    Unverified ratings go to sft / preference only with `include_unverified`; they are counted either way."""
    if not Path(db).exists():
        raise FileNotFoundError(f"{db}: no feedback database")
    store = FeedbackStore(db)
    try:
        rows = store.feedback()
    finally:
        store.close()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sft, review = [], []
    by_prompt: dict[str, dict[int, list[str]]] = defaultdict(lambda: {1: [], -1: []})
    skipped = 0
    for r in rows:
        if r["kind"] == "rating" and not include_unverified and not verified(r):
            skipped += 1
            continue
        turn = {"role": "assistant", "content": r["completion"]}
        if r["kind"] == "rating" and r["rating"] == 1:
            sft.append({"messages": r["messages"] + [turn]})
        if r["kind"] == "rating":
            answers = by_prompt[json.dumps(r["messages"], sort_keys=True)][r["rating"]]
            if r["completion"] not in answers:
                answers.append(r["completion"])
        if r["kind"] == "low_confidence" or r["rating"] == -1:
            review.append({"messages": r["messages"], "completion": r["completion"], "kind": r["kind"],
                           "comment": r["comment"], **r["meta"]})
    preference = [{"prompt": json.loads(key), "chosen": [{"role": "assistant", "content": good}],
                   "rejected": [{"role": "assistant", "content": bad}]}
                  for key, answers in by_prompt.items() for good in answers[1] for bad in answers[-1]]
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "preference.jsonl", preference)
    write_jsonl(out / "review.jsonl", review)
    return {"sft": len(sft), "preference": len(preference), "review": len(review), "unverified_skipped": skipped}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    exp = sub.add_parser("export", help="write sft.jsonl, preference.jsonl and review.jsonl")
    exp.add_argument("--db", required=True, help="the server's feedback database (serve --feedback-db)")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--include-unverified", action="store_true", help="also export ratings of conversations "
                     "that clients sent along (not answers this server gave)")
    stats = sub.add_parser("stats", help="count the feedback by kind and rating")
    stats.add_argument("--db", required=True)


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "export":
            counts = export(args.db, args.out, args.include_unverified)
            print(f"wrote {counts['sft']} SFT conversations, {counts['preference']} preference pairs and "
                  f"{counts['review']} answers to review under {args.out}"
                  + (f" ({counts['unverified_skipped']} unverified ratings left out; --include-unverified adds "
                     f"them)" if counts["unverified_skipped"] else ""))
            return 0
        if not Path(args.db).exists():
            raise FileNotFoundError(f"{args.db}: no feedback database")
        store = FeedbackStore(args.db)
        rows = store.feedback()
        store.close()
        counts: dict[str, int] = defaultdict(int)
        for r in rows:
            kind = r["kind"] if r["kind"] != "rating" else ("thumbs up" if r["rating"] == 1 else "thumbs down")
            counts[kind if r["kind"] != "rating" or verified(r) else f"{kind} (unverified)"] += 1
        print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no feedback yet")
        return 0
    except FileNotFoundError as e:
        print(f"nanoseek feedback: {e}", file=sys.stderr)
        return 2
