"""Curation of image–text pairs: unreadable records rejected, exact and near-duplicate images removed (perceptual
hash and colour layout), training images too close to a held-out image removed, then a manifest and a data card.

Records are JSONL `{"image": path, "text": ...}` or `{"image": path, "messages": [...]}` (paths relative to the
JSONL file's directory, or absolute); every other field travels with the record. Stages, in order:

    read            a record that is not an object with an image and a text or messages, an image file that is
                    missing, not an image, truncated or over MAX_PIXELS: rejected with the reason
    exact_dedup     the same decoded pixels (sha256 of size + RGB bytes) as an earlier record: removed
    near_dedup      the same structure and the same colours as an earlier record: a 64-bit DCT perceptual hash
                    within `max_distance` bits AND a colour layout within `max_colour_distance` (below): removed.
                    Pairs are found like the text dedup's (`nanoseek.data.curate.dedup`): the hash is cut into 8
                    bands of 8 bits, so any two hashes within 7 bits share a band; candidates are verified by their
                    Hamming distance and colour distance and clustered by union-find, the first of a cluster kept
    decontamination the same structure and colours as an eval image (`eval_images`), by the same test: removed

Why two signatures: the perceptual hash is computed on grey levels and thresholded at its median, so it sees where
edges and blobs are but not their colour (a red and a blue circle in the same place hash alike; their grey levels
are 94 and 84). An image that differs only in colour is a different image, often with a different answer ("What
colour is the circle?"), so near duplicates must also match in colour: `colour_layout` is the image's mean RGB over
an 8 × 8 grid (the resolution of the hash's 8 × 8 frequencies), and two layouts match when no cell's mean colour
differs by more than `max_colour_distance` (Euclidean, 0-255 RGB). Measured on the built-in 64-pixel images: a
resampled, JPEG q75 re-encoded or noised (sigma 8) copy moves no cell by more than 29; shape scenes that differ only
in colour (same shapes, same places) differ by at least 63 in some cell. The layout costs ~0.04 ms an image.

The text side of a conversation is not deduplicated here: image questions repeat their wording by design ("How
many shapes are there?") and differ by image. The manifest keeps the text curation's accounting (records = kept +
removed + rejected, removals per stage, reject reasons) in its format "nanoseek-image-curation/1".
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nanoseek.common import write_json, write_jsonl
from nanoseek.data.curate.dedup import band_columns, lsh_edges, union_find
from nanoseek.data.curate.manifest import REJECT_REASONS_SHOWN, _top_reasons

STAGES = ("exact_dedup", "near_dedup", "decontamination")
MAX_PIXELS = 16_000_000  # a larger image is refused before decoding (a decompression bomb, or not a training image)
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass
class ImageCurateConfig:
    max_distance: int = 4  # Hamming bits of the 64-bit perceptual hash that still count as the same image
    max_colour_distance: float = 45.0  # RGB distance of a colour_layout cell that still counts as the same colour
    max_pixels: int = MAX_PIXELS

    def validate(self) -> None:
        if not 0 <= self.max_distance <= 7:
            raise ValueError(f"[image_curate] max_distance={self.max_distance!r}: must lie in [0, 7] (8 bands of "
                             f"8 bits find every pair within 7)")
        if not 0 <= self.max_colour_distance <= 442:
            raise ValueError(f"[image_curate] max_colour_distance={self.max_colour_distance!r}: must lie in [0, 442] "
                             f"(0: colours equal to the grid's rounding; 442: any colour, the grey hash alone)")


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A fully decoded RGB image, or ValueError saying why not: missing, not an image, an unsupported format,
    more than max_pixels, or truncated. The size is checked from the header, before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image file") from None
    except (Image.UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning, OSError) as e:
        raise ValueError(f"{path}: not an image ({type(e).__name__})") from None
    if im.format not in FORMATS:
        raise ValueError(f"{path}: unsupported image format {im.format}; expected one of {', '.join(FORMATS)}")
    if im.width * im.height > max_pixels:
        raise ValueError(f"{path}: {im.width}x{im.height} is more than {max_pixels:,} pixels")
    try:
        im.load()
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: truncated or corrupt {im.format} ({e})") from None
    return im.convert("RGB")


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    return np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))


_DCT32 = _dct_matrix(32)


def perceptual_hash(im: Image.Image) -> int:
    """pHash: 32 × 32 grey, 2-D DCT, the 8 × 8 lowest frequencies (DC excluded from the median) against their
    median -> 64 bits. Robust to rescaling, mild noise and re-encoding; unrelated images differ in ~32 bits."""
    grey = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS), np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].reshape(-1)
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


COLOUR_GRID = 8  # colour_layout cells per side


def colour_layout(im: Image.Image) -> np.ndarray:
    """[COLOUR_GRID, COLOUR_GRID, 3] uint8: the mean RGB of each cell of an 8 × 8 grid (box-filtered). The colour
    half of the near-duplicate test (module docstring): the perceptual hash is blind to colour."""
    return np.asarray(im.convert("RGB").resize((COLOUR_GRID, COLOUR_GRID), Image.Resampling.BOX), np.uint8)


def colour_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The largest per-cell RGB Euclidean distance between colour layouts a [..., G, G, 3] and b (broadcast)."""
    d = a.astype(np.float32) - b.astype(np.float32)
    return np.sqrt((d * d).sum(-1)).max((-2, -1))


def pixel_digest(im: Image.Image) -> bytes:
    return hashlib.sha256(f"{im.width}x{im.height}".encode() + im.tobytes()).digest()


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b))


def near_duplicate_roots(hashes: np.ndarray, max_distance: int, colours: np.ndarray | None = None,
                         max_colour_distance: float = ImageCurateConfig.max_colour_distance) -> np.ndarray:
    """[N] index of the record each record is kept as (itself when first of its cluster), hashes [N] uint64.
    With colours ([N, G, G, 3] colour layouts) a pair must also match in colour (module docstring); without, the
    grey hash alone decides."""
    bands = np.stack([(hashes >> np.uint64(8 * b)) & np.uint64(255) for b in range(8)], 1).astype(np.uint32)
    u, v = lsh_edges(band_columns(bands, 8, 1))
    keep = hamming(hashes[u], hashes[v]) <= max_distance
    if colours is not None:
        u, v = u[keep], v[keep]
        keep = colour_distance(colours[u], colours[v]) <= max_colour_distance
    return union_find(len(hashes), u[keep], v[keep])


def _check_record(record: Any) -> str | None:
    if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        return "not a JSON object with an image path"
    if isinstance(record.get("text"), str):
        return None
    messages = record.get("messages")
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user",
                                                                                            "assistant")
            for m in messages):
        return None
    return "neither a text string nor a list of {role, content} messages"


def curate_images(inputs: list[str | Path], output: str | Path, eval_images: list[str | Path] = (),
                  config: ImageCurateConfig | None = None, command: str = "") -> dict[str, Any]:
    """Curate image–text JSONL files into output/: records.jsonl (kept, image paths made absolute), removed.jsonl,
    rejects.jsonl, manifest.json and data_card.md. Returns the manifest."""
    config = config or ImageCurateConfig()
    config.validate()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    records, rejects, sources = [], [], []
    for f in map(Path, inputs):
        n_before = len(records) + len(rejects)
        for line, text in enumerate(f.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            why = _check_record(record)
            if why is None:
                path = Path(record["image"])
                path = path if path.is_absolute() else f.parent / path
                try:
                    im = open_image(path, config.max_pixels)
                except ValueError as e:
                    why = str(e).removeprefix(f"{path}: ")
            if why is not None:
                rejects.append({"file": str(f), "line": line, "reason": why})
                continue
            records.append(({**record, "image": str(path.resolve())}, str(f), pixel_digest(im), perceptual_hash(im),
                            colour_layout(im)))
        sources.append({"source": str(f), "records": len(records) + len(rejects) - n_before})
    hashes = np.array([r[3] for r in records], dtype=np.uint64)
    colours = np.stack([r[4] for r in records]) if records else np.zeros((0, COLOUR_GRID, COLOUR_GRID, 3), np.uint8)
    digests = [r[2] for r in records]
    first = {}
    removed: list[tuple[int, str, str]] = []
    exact = [first.setdefault(d, i) for i, d in enumerate(digests)]
    alive = [i for i in range(len(records)) if exact[i] == i]
    removed += [(i, "exact_dedup", f"same pixels as record {exact[i]}") for i in range(len(records)) if exact[i] != i]
    roots = near_duplicate_roots(hashes[alive], config.max_distance, colours[alive], config.max_colour_distance) \
        if alive else np.zeros(0, np.int64)
    removed += [(i, "near_dedup", f"perceptual hash within {config.max_distance} bits and colours within "
                                  f"{config.max_colour_distance:g} of record {alive[r]}")
                for i, r in zip(alive, roots, strict=True) if alive[r] != i]
    alive = [i for i, r in zip(alive, roots, strict=True) if alive[r] == i]
    eval_ims = [open_image(p, config.max_pixels) for p in eval_images]
    eval_hashes = np.array([perceptual_hash(im) for im in eval_ims], np.uint64)
    eval_colours = np.stack([colour_layout(im) for im in eval_ims]) if eval_ims else None
    del eval_ims
    if len(eval_hashes) and alive:
        bits = hamming(hashes[alive][:, None], eval_hashes[None, :])
        a, e = np.nonzero(bits <= config.max_distance)  # structural candidates, then their colours
        match = colour_distance(colours[np.array(alive)[a]], eval_colours[e]) <= config.max_colour_distance
        hit = {}
        for ai, ei in zip(a[match].tolist(), e[match].tolist(), strict=True):
            hit[ai] = min(hit.get(ai, 64), int(bits[ai, ei]))  # the closest matching eval image
        removed += [(alive[k], "decontamination", f"perceptual hash within {x} bits and colours within "
                                                  f"{config.max_colour_distance:g} of an eval image")
                    for k, x in hit.items()]
        alive = [i for k, i in enumerate(alive) if k not in hit]
    write_jsonl(out / "records.jsonl", (records[i][0] for i in alive))
    write_jsonl(out / "removed.jsonl", ({"image": records[i][0]["image"], "stage": s, "reason": r}
                                        for i, s, r in sorted(removed)))
    write_jsonl(out / "rejects.jsonl", rejects)
    by_stage = Counter(s for _, s, _ in removed)
    tasks = Counter(records[i][0].get("task", "(none)") for i in alive)
    for s in sources:
        s["kept"] = sum(records[i][1] == s["source"] for i in alive)
        s["removed"] = sum(records[i][1] == s["source"] for i, _, _ in removed)
        s["rejected"] = sum(r["file"] == s["source"] for r in rejects)
    manifest = {
        "format": "nanoseek-image-curation/1",
        "totals": {"records": len(records) + len(rejects), "kept": len(alive), "removed": len(removed),
                   "rejected": len(rejects)},
        "inputs": sources,
        "rejects": {"total": len(rejects),
                    "reasons": _top_reasons(Counter(r["reason"] for r in rejects), REJECT_REASONS_SHOWN)},
        "stages": {s: {"removed": by_stage[s]} for s in STAGES},
        "eval_images": len(eval_hashes),
        "tasks": dict(sorted(tasks.items())),
        "config": asdict(config),
    }
    t = manifest["totals"]
    if t["records"] != t["kept"] + t["removed"] + t["rejected"]:
        raise RuntimeError(f"accounting mismatch: {t}")
    write_json(out / "manifest.json", manifest)
    (out / "data_card.md").write_text(image_data_card(manifest, command), encoding="utf-8")
    return manifest


def image_data_card(manifest: dict[str, Any], command: str) -> str:
    """Markdown summary of an image curation manifest."""
    t = manifest["totals"]
    lines = ["# Data card (images)", "", f"Curated with `{command}`." if command else "", "",
             f"**{t['records']:,}** image–text records -> **{t['kept']:,}** kept, {t['removed']:,} removed, "
             f"{t['rejected']:,} rejected as unreadable (kept + removed + rejected = records).", "",
             "| source | records | kept | removed | rejected |", "|---|---:|---:|---:|---:|"]
    lines += [f"| `{s['source']}` | {s['records']:,} | {s['kept']:,} | {s['removed']:,} | {s['rejected']:,} |"
              for s in manifest["inputs"]]
    lines += ["", "| stage | removed |", "|---|---:|"]
    lines += [f"| {s} | {v['removed']:,} |" for s, v in manifest["stages"].items()]
    colour = manifest["config"].get("max_colour_distance")
    lines += ["", f"Near duplicates: perceptual hash within {manifest['config']['max_distance']} of 64 bits"
              + (f" and 8 × 8 colour layout within {colour:g} (RGB)" if colour is not None else "")
              + f"; decontaminated against {manifest['eval_images']:,} eval images."]
    if manifest["rejects"]["reasons"]:
        lines += ["", "Rejected: " + "; ".join(f"{r} ({n:,})" for r, n in manifest["rejects"]["reasons"].items())
                  + "."]
    if manifest["tasks"]:
        lines += ["", "Kept by task: " + ", ".join(f"{k} {n:,}" for k, n in manifest["tasks"].items()) + "."]
    return "\n".join(lines) + "\n"
