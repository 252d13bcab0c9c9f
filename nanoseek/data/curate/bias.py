"""The data card's bias report: how often each demographic group is mentioned, per domain and per source.

Groups are word lists by category (gender, religion, nationality, age; `lists/bias_terms.txt`, documented there
and replaceable with `[bias] terms_path`). Every kept document's whole-word, case-insensitive mentions are counted
per group. Within a category, a domain's or source's shares show whom its text talks about; the category is
flagged when the most-mentioned group has more than `max_ratio` times the mentions of the least-mentioned one
(add-one smoothed, so a group never mentioned counts), once the category has `min_mentions` mentions there.

Counting is not judging: a skew may be the subject of a text (a history of kings). The report's remedy is the
one the data card's mixing already offers: reweighting, here the factor by which documents that mention a group
would be sampled for the groups to be mentioned equally (`reweight`; a never-mentioned group needs data, not
weight, and gets none).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LISTS_DIR = Path(__file__).parent / "lists"


@dataclass
class BiasConfig:
    enabled: bool = True
    terms_path: str = ""  # "<category><TAB><group><TAB>term, term, ..." lines; "" = lists/bias_terms.txt
    max_ratio: float = 4.0  # flag a category whose groups' mentions differ by more than this factor
    min_mentions: int = 20  # fewer mentions of a category in a domain or source: not judged


@functools.cache
def load_terms(path: str = "") -> dict[str, dict[str, re.Pattern[str]]]:
    """category -> group -> one regex of the group's terms as whole words."""
    file = Path(path) if path else LISTS_DIR / "bias_terms.txt"
    terms: dict[str, dict[str, re.Pattern[str]]] = {}
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        words = [w.strip().lower() for w in parts[-1].split(",") if w.strip()] if len(parts) == 3 else []
        if not words:
            raise ValueError(f"{file}:{n}: expected '<category><TAB><group><TAB>term, term, ...'")
        alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        terms.setdefault(parts[0], {})[parts[1]] = re.compile(rf"(?<![\w'])(?:{alternatives})(?![\w'])", re.I)
    return terms


def count_mentions(text: str, config: BiasConfig) -> dict[str, Counter[str]]:
    """category -> Counter(group -> mentions) of one text (categories without a mention left out)."""
    out: dict[str, Counter[str]] = {}
    for category, groups in load_terms(config.terms_path).items():
        found = Counter({g: n for g, p in groups.items() if (n := sum(1 for _ in p.finditer(text)))})
        if found:
            out[category] = found
    return out


def add(total: dict[str, dict[str, int]], counts: dict[str, Counter[str] | dict[str, int]]) -> None:
    """Add one document's (or one task's) counts into a running total, in place."""
    for category, groups in counts.items():
        into = total.setdefault(category, {})
        for group, n in groups.items():
            into[group] = into.get(group, 0) + n


def judge(counts: dict[str, dict[str, int]], config: BiasConfig) -> dict[str, dict[str, Any]]:
    """Per category: mentions, shares of its groups (all groups of the word list), the smoothed max/min ratio,
    whether it is flagged, and the reweighting factors that would even the mentions out."""
    out = {}
    for category, groups in load_terms(config.terms_path).items():
        n = {g: counts.get(category, {}).get(g, 0) for g in groups}
        total = sum(n.values())
        if not total:
            continue
        ratio = (max(n.values()) + 1) / (min(n.values()) + 1)
        judged = total >= config.min_mentions
        mean = total / len(n)
        out[category] = {"mentions": total, "shares": {g: round(c / total, 4) for g, c in n.items()},
                         "ratio": round(ratio, 2), "judged": judged, "flagged": judged and ratio > config.max_ratio,
                         "reweight": {g: round(mean / c, 3) if c else None for g, c in n.items()}}
    return out


def report(by_domain: dict[str, dict[str, dict[str, int]]], by_source: dict[str, dict[str, dict[str, int]]],
           config: BiasConfig) -> dict[str, Any]:
    """The manifest's `bias` entry: the judged counts per domain and per source, and the flagged places."""
    domains = {d: judge(c, config) for d, c in sorted(by_domain.items())}
    sources = {s: judge(c, config) for s, c in sorted(by_source.items())}
    flagged = [{"domain": d, "category": c} for d, cats in domains.items() for c, r in cats.items() if r["flagged"]]
    flagged += [{"source": s, "category": c} for s, cats in sources.items() for c, r in cats.items() if r["flagged"]]
    return {"max_ratio": config.max_ratio, "min_mentions": config.min_mentions, "domains": domains,
            "sources": sources, "flagged": flagged}


def card_lines(bias: dict[str, Any]) -> list[str]:
    """The data card's section."""
    lines = ["", "## Bias report", "",
             f"Mentions of demographic term groups in the kept documents (`lists/bias_terms.txt`). A category is "
             f"flagged when its most-mentioned group has more than {bias['max_ratio']:g}x the mentions of its "
             f"least-mentioned one (add-one smoothed; judged from {bias['min_mentions']} mentions). Remedy: "
             f"sample the documents that mention a group `reweight` times as often.", "",
             "| where | category | mentions | shares | ratio | flagged | reweight |", "|---|---|---:|---|---:|---|---|"]
    for kind in ("domains", "sources"):
        for where, cats in bias[kind].items():
            for category, r in cats.items():
                shares = ", ".join(f"{g} {s:.2f}" for g, s in r["shares"].items())
                weights = ", ".join(f"{g} ×{w:g}" for g, w in r["reweight"].items() if w is not None)
                flag = "**yes**" if r["flagged"] else ("no" if r["judged"] else "(too few)")
                lines.append(f"| {kind[:-1]} `{where}` | {category} | {r['mentions']:,} | {shares} | {r['ratio']:g} | "
                             f"{flag} | {weights if r['flagged'] else ''} |")
    if not bias["domains"]:
        lines.append("| — | no mentions | | | | | |")
    return lines
