"""DeepSeek Sparse Attention against dense MLA on this CPU: prefill and per-token decode time at long contexts, and
the validation loss of a short continued pretraining, dense vs DSA (V3.2's dense warm-up, then sparse training).

1. Speed (`--preset`, default `tiny` with its indexer: 4 heads of 32, top-256; random weights, fp32, batch 1): for
   each context T, the prefill of T tokens through the latent cache (`forward_cached`, as the engine admits a
   prompt) and then --new-tokens decode steps through the engine's decoder (`nanoseek.infer.decoder`), DSA and
   dense MLA with the same weights in one process, sides alternated every repeat. Reported: median seconds, the
   spread (min-max) and the DSA/dense ratio of the medians; the crossover is where that ratio crosses 1.
2. Quality: a dense MLA base pretrained on the debug recipe (seq_len 128, so top-16 keeps an eighth of the keys at
   the end of a sequence), then continued for the same steps and schedule twice from the same weights and data
   order: dense MLA, and DSA (first --warmup steps in which the indexers learn with dense attention and
   everything else frozen, then the sparse stage). Reported: the validation loss of the base and each side.

    python bench/sparse_attention.py                                   # ~10 min on 2 busy CPU cores
    python bench/sparse_attention.py --contexts 256,512 --new-tokens 4 --repeats 1 --base-steps 20 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.config import load_recipe
from nanoseek.infer.decoder import Decoder
from nanoseek.model import LatentCache, Transformer, preset
from nanoseek.train.metrics import read_metrics
from nanoseek.train.parallelize import init_parallel
from nanoseek.train.pretrain import PretrainConfig, Trainer, pretrain


# --- 1. speed -------------------------------------------------------------------------------------------------
def models(name: str, longest: int) -> dict[str, Transformer]:
    """Dense MLA and DSA of one preset, sharing every weight but the indexers'."""
    torch.manual_seed(0)
    dense = Transformer(preset(name, max_position_embeddings=longest)).eval()
    dsa = Transformer(preset(name, max_position_embeddings=longest, attention="dsa")).eval()
    missing, unexpected = dsa.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(".indexer." in k for k in missing)
    return {"dense": dense, "dsa": dsa}


@torch.no_grad()
def prefill_and_decode(model: Transformer, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decoded token) of one prompt ids [1, T]."""
    cfg, T = model.config, ids.shape[1]
    cache = LatentCache.empty(cfg, 1, T + new, layers=cfg.num_hidden_layers)
    t0 = time.perf_counter()
    h = model.forward_cached(ids, cache, 0, hidden=True)
    token = model.head(h[:, -1]).argmax(-1, keepdim=True)
    prefill = time.perf_counter() - t0
    decoder = Decoder(model)
    t0 = time.perf_counter()
    for i in range(new):
        h = decoder.forward(token, cache, T + i, None, torch.tensor([[T + i]]))
        token = model.head(h[:, 0]).argmax(-1, keepdim=True)
    return prefill, (time.perf_counter() - t0) / new


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def speed(args) -> list[dict]:
    contexts = [int(c) for c in args.contexts.split(",")]
    sides = models(args.preset, max(contexts) + args.new_tokens)
    print(f"preset {args.preset}: index_topk {sides['dsa'].config.index_topk}, {torch.get_num_threads()} threads")
    rows = []
    for T in contexts:
        ids = torch.randint(3, sides["dense"].config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        times = {s: {"prefill": [], "decode": []} for s in sides}
        for rep in range(args.repeats):
            for side in (("dense", "dsa") if rep % 2 == 0 else ("dsa", "dense")):
                p, d = prefill_and_decode(sides[side], ids, args.new_tokens)
                times[side]["prefill"].append(p)
                times[side]["decode"].append(d)
        row = {"context": T, **{f"{s}_{k}": summary(v) for s in sides for k, v in times[s].items()}}
        for k in ("prefill", "decode"):
            row[f"{k}_ratio"] = row[f"dsa_{k}"]["median"] / row[f"dense_{k}"]["median"]
        rows.append(row)
        print(f"T={T:5d}  prefill dense {fmt(row['dense_prefill'])} s  dsa {fmt(row['dsa_prefill'])} s  "
              f"dsa/dense {row['prefill_ratio']:.2f}   decode/token dense {fmt(row['dense_decode'], 1e3)} ms  "
              f"dsa {fmt(row['dsa_decode'], 1e3)} ms  dsa/dense {row['decode_ratio']:.2f}", flush=True)
    return rows


def fmt(s: dict, unit: float = 1.0) -> str:
    return f"{s['median'] * unit:.3g} [{s['min'] * unit:.3g}-{s['max'] * unit:.3g}]"


def crossover(rows: list[dict], key: str) -> str:
    """The measured interval from which DSA stays faster (ratio < 1 at that context and every longer one)."""
    wins = 0
    while wins < len(rows) and rows[len(rows) - 1 - wins][f"{key}_ratio"] < 1:
        wins += 1
    if not wins:
        return f"none up to {rows[-1]['context']} (DSA slower at the longest measured context)"
    first = rows[len(rows) - wins]["context"]
    if wins == len(rows):
        return f"at or below {first}"
    return f"between {rows[len(rows) - wins - 1]['context']} and {first}"


# --- 2. quality ---------------------------------------------------------------------------------------------------
def quality(args, root: Path) -> dict:
    sets = [f"pretrain.seq_len={args.seq_len}", "pretrain.micro_batch=4", f"pretrain.global_batch_tokens="
            f"{4 * args.seq_len * 2}", "pretrain.plots=false", "pretrain.save_every=0",
            f"pretrain.val_batches={args.val_batches}", "pretrain.warmup_steps=10", "pretrain.decay_start=0.5"]
    base_recipe = load_recipe("debug", [*sets, f"pretrain.max_steps={args.base_steps}", "pretrain.val_every=0"])
    t0 = time.perf_counter()
    pretrain(base_recipe, root / "base", progress=False)
    base = [r for r in read_metrics(root / "base" / "metrics.jsonl") if "val_loss" in r][-1]
    print(f"base: dense MLA, {args.base_steps} steps, val loss {base['val_loss']:.4f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    from nanoseek.model import load

    weights = load(root / "base").state_dict()
    result = {"base_val_loss": base["val_loss"], "base_steps": args.base_steps, "steps": args.steps,
              "dsa_warmup_steps": args.warmup, "seq_len": args.seq_len,
              "index_topk": preset("debug", attention="dsa").index_topk}
    def continue_training(name: str, start: dict, steps: int, *extra: str) -> Trainer:
        recipe = load_recipe("debug", [*sets, f"pretrain.max_steps={steps}", f"pretrain.val_every={steps}", *extra])
        trainer = Trainer(recipe, PretrainConfig(**recipe["pretrain"]), root / name,
                          init_parallel(None, device="cpu"), progress=False)
        missing, unexpected = trainer.model.load_state_dict(start, strict=False)
        assert not unexpected and all(".indexer." in k for k in missing)  # only the indexers start from scratch
        trainer.run()
        return trainer

    # V3.2's two stages as two runs, so that the sparse stage has the dense side's steps and schedule exactly
    t0 = time.perf_counter()
    continue_training("dense", weights, args.steps)
    seconds = {"dense": time.perf_counter() - t0}
    t0 = time.perf_counter()
    warm = continue_training("dsa_warmup", weights, args.warmup, "model.attention=dsa",
                             f"pretrain.dsa_warmup_steps={args.warmup}")
    continue_training("dsa", warm.model.state_dict(), args.steps, "model.attention=dsa")
    seconds["dsa"] = time.perf_counter() - t0
    for side in ("dense", "dsa_warmup", "dsa"):
        records = read_metrics(root / side / "metrics.jsonl")
        val = [r for r in records if "val_loss" in r][-1]
        result[side] = {"val_loss": val["val_loss"], "seconds": seconds.get(side)}
        if side != "dense":
            kl = [r["indexer_kl"] for r in records if "loss" in r]
            result[side].update(val_indexer_kl=val["val_indexer_kl"], train_kl_first=kl[0], train_kl_last=kl[-1])
        print(f"{side}: val loss {val['val_loss']:.4f}" + (f", val indexer KL {val['val_indexer_kl']:.4f}"
                                                           if side != "dense" else ""), flush=True)
    result["val_loss_delta"] = result["dsa"]["val_loss"] - result["dense"]["val_loss"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model preset of the speed part (its indexer sizes)")
    ap.add_argument("--contexts", default="1024,2048,4096,8192", help="comma-separated prompt lengths")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per context")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base-steps", type=int, default=300, help="dense pretraining before the comparison")
    ap.add_argument("--steps", type=int, default=200, help="continued pretraining steps per side")
    ap.add_argument("--warmup", type=int, default=50, help="DSA's dense warm-up steps (before its --steps)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    if not args.skip_speed:
        results["speed"] = speed(args)
        results["prefill_crossover"] = crossover(results["speed"], "prefill")
        results["decode_crossover"] = crossover(results["speed"], "decode")
        print(f"crossover: prefill {results['prefill_crossover']}; decode {results['decode_crossover']}")
    if not args.skip_quality:
        with tempfile.TemporaryDirectory() as tmp:
            results["quality"] = quality(args, Path(tmp))
        q = results["quality"]
        print(f"validation loss: base {q['base_val_loss']:.4f}, dense {q['dense']['val_loss']:.4f}, "
              f"DSA {q['dsa']['val_loss']:.4f} (DSA - dense {q['val_loss_delta']:+.4f})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
