"""The curation manifest (`manifest.json`) and its human-readable data card (`data_card.md`).

The manifest is the run's account: records per input, removals per stage (with the most common reasons), PII
replacements, the domain mix of what was kept, and mixing weights that rebalance domains to target proportions.
Its totals satisfy records = kept + removed + rejected exactly, the removals add up per stage and the rejects per
reason; `build_manifest` refuses to write one that does not.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nanoseek.data.curate.bias import BiasConfig, add, card_lines
from nanoseek.data.curate.bias import report as bias_report

STAGES = ("normalize", "language", "quality", "toxicity", "decontamination", "pii", "exact_dedup", "near_dedup")
REJECT_REASONS_SHOWN = 20  # reject reasons listed one by one; the rarer ones are added up under OTHER_REASONS
OTHER_REASONS = "(other reasons)"


@dataclass
class MixConfig:
    """Target share of each domain in training (by characters, the closest proxy for tokens before a tokenizer
    exists). Empty = every domain present gets an equal share. Shares are normalised to sum to 1."""

    targets: dict[str, float] = field(default_factory=dict)


def reason_kind(reason: str) -> str:
    """A reason with its measured values blanked, so removals aggregate by rule: "gopher_quality: 12 words < 50"
    and "... 31 words < 50" are both "gopher_quality: N words < N"."""
    reason = re.sub(r"'[^']*'", "'…'", reason)
    return re.sub(r"\d+(?:[.,]\d+)*", "N", reason)


def mixing_weights(chars: dict[str, int], targets: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """Per domain: natural share of characters, target share, and weight = target / share -- the factor by
    which to multiply the domain's natural sampling rate (2.0 = see it twice as often, 0 = drop it).
    Sampling each domain d with probability target_d (or each document with weight_d) gives the target mix.
    A domain with a target but no data has weight None: no factor can create it."""
    for d, t in targets.items():
        if not t >= 0:
            raise ValueError(f"mix.targets[{d!r}] must be >= 0, got {t}")
    total = sum(chars.values())
    wanted = dict(targets) if targets else {d: 1.0 for d in chars if chars[d] > 0}
    if not wanted:  # nothing was kept and no targets were asked for: there is no mix to describe
        return {}
    norm = sum(wanted.values())
    if norm <= 0:
        raise ValueError("mix.targets must give a positive share to at least one domain")
    out: dict[str, dict[str, float | None]] = {}
    for d in sorted(set(chars) | set(wanted)):
        share = chars.get(d, 0) / total if total else 0.0
        target = wanted.get(d, 0.0) / norm
        weight = round(target / share, 6) if share > 0 else (None if target > 0 else 0.0)
        out[d] = {"share": round(share, 6), "target": round(target, 6), "weight": weight}
    return out


def build_manifest(
    *,
    inputs: list[dict[str, Any]],
    task_stats: list[dict[str, Any]],
    written: list[dict[str, Any]],
    skipped_files: list[str],
    stage_enabled: dict[str, bool],
    targets: dict[str, float],
    config: dict[str, Any],
    fingerprint: str,
    bias: BiasConfig | None = None,
) -> dict[str, Any]:
    """Add up per-task statistics into the manifest; checks the accounting identity."""
    bias = bias or BiasConfig()
    per_source: dict[str, Counter[str]] = {}
    removed_by_stage: Counter[str] = Counter()
    reject_reasons: Counter[str] = Counter()
    reasons: dict[str, Counter[str]] = {s: Counter() for s in STAGES}
    pii: Counter[str] = Counter()
    domains: dict[str, Counter[str]] = {}
    labels: dict[str, dict[str, Counter[str]]] = {}
    mentions: dict[str, dict[str, dict[str, dict[str, int]]]] = {"domains": {}, "sources": {}}
    for stats, final in zip(task_stats, written, strict=True):
        for kind in ("domains", "sources"):
            for where, counts in final.get("mentions", {}).get(kind, {}).items():
                add(mentions[kind].setdefault(where, {}), counts)
        for source, counts in stats["sources"].items():
            per_source.setdefault(source, Counter()).update(counts)
        for source, counts in final["sources"].items():
            per_source.setdefault(source, Counter()).update(counts)
        for stage, kinds in (stats["reasons"] | final["reasons"]).items():
            reasons[stage].update(kinds)
        removed_by_stage.update(stats["removed"])
        removed_by_stage.update(final["removed"])
        reject_reasons.update(stats["reject_reasons"])
        pii.update(stats["pii"])
        for domain, counts in final["domains"].items():
            domains.setdefault(domain, Counter()).update(counts)
        for source, kinds in final["kept_labels"].items():
            for kind, counts in kinds.items():
                labels.setdefault(source, {}).setdefault(kind, Counter()).update(counts)
    totals = Counter()
    for counts in per_source.values():
        totals.update(counts)
    kept = totals["records"] - totals["rejected"] - totals["removed"]
    if (kept != totals["kept"] or sum(removed_by_stage.values()) != totals["removed"]
            or sum(reject_reasons.values()) != totals["rejected"]):
        raise RuntimeError(
            f"accounting mismatch: records {totals['records']} != kept {totals['kept']} + removed "
            f"{totals['removed']} + rejected {totals['rejected']} (by stage: {dict(removed_by_stage)}, "
            f"rejects by reason: {dict(reject_reasons)})"
        )
    chars = {d: c["chars"] for d, c in domains.items()}
    mix = mixing_weights(chars, targets)
    for entry in inputs:
        entry.update({k: per_source.get(entry["source"], Counter())[k]
                      for k in ("records", "kept", "removed", "rejected")})
        kept = labels.get(entry["source"], {})
        entry["kept_domains"] = dict(kept.get("domains", Counter()).most_common())
        entry["kept_licenses"] = dict(kept.get("licenses", Counter()).most_common())
    return {
        "format": "nanoseek-curation/1",
        "fingerprint": fingerprint,
        "totals": {k: totals[k] for k in ("records", "kept", "removed", "rejected")},
        "inputs": inputs,
        "skipped_files": skipped_files,
        "rejects": {"total": totals["rejected"], "reasons": _top_reasons(reject_reasons, REJECT_REASONS_SHOWN)},
        "stages": {
            s: {"enabled": stage_enabled[s], "removed": removed_by_stage[s],
                "reasons": dict(reasons[s].most_common(20))}
            for s in STAGES
        },
        "pii_replacements": dict(sorted(pii.items())),
        "domains": {d: {"docs": c["docs"], "chars": c["chars"], **mix.get(d, {})} for d, c in sorted(domains.items())},
        "mixing": {
            "basis": "characters",
            "targets": {d: m["target"] for d, m in mix.items()},
            "weights": {d: m["weight"] for d, m in mix.items()},
            "missing_domains": sorted(d for d, m in mix.items() if m["target"] > 0 and m["share"] == 0),
        },
        "shards": [{"file": w["file"], "docs": w["docs"], "bytes": w["bytes"]} for w in written],
        "bias": bias_report(mentions["domains"], mentions["sources"], bias),
        "config": config,
    }


def _top_reasons(counts: Counter[str], shown: int) -> dict[str, int]:
    """The `shown` most common reasons with the rest added up under OTHER_REASONS, so the counts still sum to the
    total however many distinct reasons there are."""
    top = dict(counts.most_common(shown))
    rest = sum(counts.values()) - sum(top.values())
    return top | {OTHER_REASONS: rest} if rest else top


def data_card(manifest: dict[str, Any], command: str) -> str:
    """Markdown summary of a manifest: what went in, what came out, why things were removed, the domain mix."""
    t = manifest["totals"]
    lines = [
        "# Data card",
        "",
        f"Curated with `{command}`.",
        "",
        f"**{t['records']:,}** input records -> **{t['kept']:,}** kept, {t['removed']:,} removed, "
        f"{t['rejected']:,} rejected as unreadable (kept + removed + rejected = records).",
        "",
        "## Sources",
        "",
        "| source | kind | tag | records | kept | removed | rejected | kept by domain | kept by licence |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for s in manifest["inputs"]:
        by_domain = ", ".join(f"{d} {n:,}" for d, n in s["kept_domains"].items()) or "-"
        by_license = ", ".join(f"{x} {n:,}" for x, n in s["kept_licenses"].items()) or "-"
        lines.append(f"| `{s['source']}` | {s['kind']} | {s['tag']} | {s['records']:,} | {s['kept']:,} | "
                     f"{s['removed']:,} | {s['rejected']:,} | {by_domain} | {by_license} |")
    if manifest["skipped_files"]:
        lines += ["", f"Skipped {len(manifest['skipped_files'])} file(s) of unknown format, e.g. "
                  f"`{manifest['skipped_files'][0]}`."]
    if manifest["rejects"]["reasons"]:
        lines += ["", "Rejected as unreadable: " + "; ".join(
            f"{r} ({n:,})" for r, n in manifest["rejects"]["reasons"].items()) + "."]
    lines += ["", "## Stages", "", "| stage | on | removed | most common reasons |", "|---|---|---:|---|"]
    for name, s in manifest["stages"].items():
        top = "; ".join(f"{r} ({n:,})" for r, n in list(s["reasons"].items())[:3]) or "-"
        lines.append(f"| {name} | {'yes' if s['enabled'] else 'no'} | {s['removed']:,} | {top} |")
    pii = manifest["pii_replacements"]
    lines += ["", "PII replaced by placeholders: "
              + (", ".join(f"{k} {v:,}" for k, v in pii.items()) if pii else "none found") + "."]
    lines += ["", "## Domain mix", "", "Shares are by characters. Pretraining draws the target mix when it is given "
              "as `[data] mix` (the loader samples each domain's tokens in those shares); `weight` is how much that "
              "multiplies a domain's natural sampling rate.", "", "| domain | docs | chars | share | target | weight |",
              "|---|---:|---:|---:|---:|---:|"]
    for d, s in manifest["domains"].items():
        lines.append(f"| {d} | {s['docs']:,} | {s['chars']:,} | {s['share']:.3f} | {s['target']:.3f} | "
                     f"{s['weight']:.3f} |")  # kept domains always have data, so a weight
    if manifest["mixing"]["missing_domains"]:
        lines += ["", f"Target domains without any kept document: {manifest['mixing']['missing_domains']}."]
    if manifest.get("bias"):
        lines += card_lines(manifest["bias"])
    return "\n".join(lines) + "\n"
