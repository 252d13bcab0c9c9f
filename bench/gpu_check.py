"""GPU truth: one command that proves nanoseek's GPU paths, for the first session that is lent a GPU.

Five parts, each guarded (a failure is recorded with its error and the next part still runs), every result in
one JSON file written after each part (so a run stopped by its time limit keeps what it measured) and a table
printed at the end:

  1. correctness  a debug model's logits on the device (fp32, TF32 off) vs the CPU; 20 steps of the debug
                  recipe (`nanoseek pretrain`) on the device vs the CPU, losses within 1e-3 relative; greedy
                  decoding with the engine identical on both.
  2. mfu          bf16 training step (autocast, fp32 master weights, fused AdamW, MTP on) of the `base` preset
                  (~0.7B: MLA + MoE + MTP) under torch.compile at the largest micro-batch that fits: tokens/s and
                  MFU against the GPU's bf16 dense peak and against a measured bf16 GEMM; transformers'
                  DeepseekV3ForCausalLM (same weights, bf16, eager) in the same run as the peer.
  3. fp8          DeepSeek-V3's block-wise FP8 (1×128 activations, 128×128 weights): the GEMM against its exact
                  emulation and its speed against bf16; the training step time vs bf16 on the same config, and
                  the relative loss difference after the same 100 steps on the same batches (V3's bound: 0.25%).
  4. inference    engine decode tokens/s at B1 and B64 vs transformers `generate`, bf16, same weights, greedy.
  5. distributed  FSDP2 + DCP save/load with the process group initialised (NCCL on a GPU) at world size 1.

    python3 bench/gpu_check.py --out gpu_check.json               # on the GPU machine, ≤ 8 minutes on an H100
    python bench/gpu_check.py --device cpu --smoke                # tiny sizes on the CPU (the test suite runs it)

It runs with whatever torch the machine has: where a part needs an API this torch lacks, it is skipped with the
reason. Parts that have not started when --budget-s runs out are skipped, so the script ends in time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when nanoseek is not installed

import train_speed  # noqa: E402 - the peer's step, beside this file

from nanoseek.common import write_json  # noqa: E402
from nanoseek.model import Transformer, preset  # noqa: E402
from nanoseek.model.balance import update_bias  # noqa: E402
from nanoseek.train.metrics import matmul_peak_flops  # noqa: E402
from nanoseek.train.objectives import pretrain_loss  # noqa: E402

H100_BF16_DENSE_PEAK = 989e12  # FLOP/s, NVIDIA's H100 SXM figure without sparsity
PARTS = ("correctness", "distributed", "mfu", "inference", "fp8")  # cheap first: a budget cut skips the last


class Skip(Exception):
    """A part that cannot run here (an API this torch lacks, no GPU for a GPU-only check, no time left)."""


# --- helpers -------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def markov_batches(vocab: int, batch: int, seq_len: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """n batches [batch, seq_len + 1] from a fixed sparse random Markov chain (4 successors per token): text with
    structure to learn, so that losses fall and the FP8 / bf16 comparison is made on a learning curve."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = []
    for _ in range(n):
        ids = torch.empty(batch, seq_len + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        choice = torch.randint(0, 4, (batch, seq_len), generator=g)
        for t in range(seq_len):
            ids[:, t + 1] = successors[ids[:, t], choice[:, t]]
        out.append(ids)
    return out


def train_step(model: Transformer, opt: torch.optim.Optimizer, ids: torch.Tensor, bf16: bool,
               call: Callable[..., Any] | None = None) -> torch.Tensor:
    """nanoseek's pretraining step: forward (MTP and balance extras), loss, backward, clip, AdamW, bias update.
    `call` is the (compiled) module to run; the loss comes back as a tensor (no host sync here)."""
    device = ids.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = (call or model)(ids[:, :-1], extras=True)
        loss, _ = pretrain_loss(out, ids[:, 1:], mtp_lambda=0.3, balance_alpha=1e-4)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_bias(model, out.expert_counts, 1e-3)
    return loss.detach()


def hf_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    """train_speed.py's transformers step under bf16 autocast (fp32 master weights, as nanoseek's)."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        return train_speed.hf_step(model, opt, ids)


def adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, **fused)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def to_hf(model: Transformer, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' DeepseekV3ForCausalLM with `model`'s weights (through an HF checkpoint directory)."""
    try:
        from transformers import DeepseekV3ForCausalLM
    except ImportError as e:
        raise Skip(f"transformers with DeepseekV3ForCausalLM is not installed ({e})") from e
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype).to(device)


# --- 1. correctness -------------------------------------------------------------------------------------------
def check_correctness(device: torch.device, smoke: bool) -> dict[str, Any]:
    from nanoseek.config import load_recipe
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.train.metrics import read_metrics
    from nanoseek.train.pretrain import pretrain

    out: dict[str, Any] = {}
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the comparison
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cpu_model = Transformer(preset("debug")).eval()
    dev_model = copy.deepcopy(cpu_model).to(device)
    ids = torch.randint(0, cpu_model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (cpu_model(ids) - dev_model(ids.to(device)).cpu()).abs().max().item()
    out["logits_max_abs_diff"] = diff
    out["logits_ok"] = diff <= 1e-4

    # 20 steps of the debug recipe, the same command on both devices
    steps = 4 if smoke else 20
    losses = {}
    with tempfile.TemporaryDirectory() as d:
        for where in ("cpu", device.type):
            if where in losses:
                continue
            recipe = load_recipe("debug", [f"pretrain.device={where}", "pretrain.plots=false",
                                           f"pretrain.val_every={steps}", f"pretrain.save_every={steps}"])
            run = Path(d) / where
            pretrain(recipe, run, max_steps=steps, progress=False)
            losses[where] = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    a, b = losses["cpu"], losses[device.type]
    rel = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
    out.update(train_steps=len(a), train_loss_cpu=a[-1], train_loss_device=b[-1], train_max_rel_diff=rel,
               train_ok=rel <= 1e-3)

    # greedy decoding through the engine (what chat, serve, eval and RL use), 24 tokens for 3 prompts
    prompts = [ids[0, :8].tolist(), ids[1, :5].tolist(), ids[0, 10:22].tolist()]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    tokens = {}
    for where, model in (("cpu", cpu_model), ("device", dev_model)):
        results = Engine(model, max_batch=len(prompts), max_len=64).generate(prompts, params)
        tokens[where] = [c.tokens for c in results]
    same = tokens["cpu"] == tokens["device"]
    out.update(greedy_identical=same)
    out["ok"] = out["logits_ok"] and out["train_ok"] and same
    return out


# --- 2. bf16 training MFU ---------------------------------------------------------------------------------------
def check_mfu(device: torch.device, smoke: bool, args: argparse.Namespace) -> dict[str, Any]:
    name = "debug" if smoke else args.preset
    seq = 32 if smoke else args.seq_len
    cfg = preset(name, num_nextn_predict_layers=1, max_position_embeddings=max(seq + 1, 512))
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    flops = model.flops_per_token(seq)
    out: dict[str, Any] = {"preset": name, "params_b": model.num_params() / 1e9,
                           "active_params_b": model.num_params(active=True) / 1e9, "seq_len": seq,
                           "flops_per_token": flops}
    opt = adamw(model, device)

    # the largest micro-batch that fits, found eagerly (a compiled step uses no more memory than an eager one)
    batch = None
    for b in ([2] if smoke else args.batches):
        try:
            ids = torch.randint(0, cfg.vocab_size, (b, seq + 1), device=device)
            train_step(model, opt, ids, bf16=True)
            sync(device)
            batch = b
            break
        except Exception as e:  # noqa: BLE001 - an out-of-memory error of any kind means: try smaller
            if not is_oom(e):
                raise
            opt.zero_grad(set_to_none=True)
            free(device)
    if batch is None:
        raise RuntimeError("no micro-batch fits, even the smallest")
    out["micro_batch"] = batch
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

    call, compile_s = model, 0.0
    if args.compile and not smoke:
        call = torch.compile(model)
        compile_s, _ = timed(lambda: train_step(model, opt, ids, True, call), device)
        train_step(model, opt, ids, True, call)  # a second call may still specialise
    out["compile"] = call is not model
    out["compile_s"] = compile_s

    steps = 2 if smoke else args.steps
    times = [timed(lambda: train_step(model, opt, ids, True, call), device)[0] for _ in range(steps)]
    step_s = statistics.median(times)
    tps = batch * seq / step_s
    measured = matmul_peak_flops(device, torch.bfloat16) if device.type == "cuda" else \
        matmul_peak_flops(device, torch.float32)
    out.update(step_s=step_s, tokens_per_s=tps, measured_gemm_peak=measured,
               mfu_vs_dense_peak=tps * flops / H100_BF16_DENSE_PEAK, mfu_vs_measured=tps * flops / measured)

    # the peer: transformers' model with the same weights and the same bf16 step (it has no MTP: its FLOPs are
    # counted without the MTP module, like ours)
    try:
        opt = None  # its state's memory goes to the peer
        free(device)
        hf = to_hf(model, device).train()
        hf_opt = adamw(hf, device)
        hf_batch = batch
        while True:
            try:
                hf_ids = ids[:hf_batch]
                hf_step(hf, hf_opt, hf_ids)
                break
            except Exception as e:  # noqa: BLE001
                if not is_oom(e) or hf_batch == 1:
                    raise
                hf_opt.zero_grad(set_to_none=True)
                free(device)
                hf_batch //= 2
        hf_times = [timed(lambda: hf_step(hf, hf_opt, hf_ids), device)[0] for _ in range(steps)]
        hf_tps = hf_batch * seq / statistics.median(hf_times)
        out.update(peer="transformers DeepseekV3ForCausalLM (bf16 autocast, eager)", peer_micro_batch=hf_batch,
                   peer_tokens_per_s=hf_tps, peer_mfu_vs_dense_peak=hf_tps * flops / H100_BF16_DENSE_PEAK,
                   ours_over_peer=tps / hf_tps)
    except Skip as e:
        out["peer"] = f"skipped: {e}"
    out["ok"] = True
    return out


# --- 3. FP8 --------------------------------------------------------------------------------------------------
def check_fp8(device: torch.device, smoke: bool, args: argparse.Namespace) -> dict[str, Any]:
    from nanoseek.train import fp8

    out: dict[str, Any] = {}
    # the GEMM: block-wise kernel (SM90, torch with F.scaled_mm) against its exact emulation, then its speed
    n = 256 if smoke else 4096
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g)
    b = torch.randn(n, n, device=device, generator=g)
    kernel = fp8._blockwise_supported(a, b, (1, fp8.TILE), (fp8.TILE, fp8.TILE))
    out["blockwise_kernel"] = kernel
    if not kernel:
        out["blockwise_kernel_why"] = ("no CUDA device" if device.type != "cuda" else
                                       f"needs SM90 and F.scaled_mm (torch {torch.__version__} has "
                                       f"scaled_mm: {hasattr(F, 'scaled_mm')})")
    qa, sa = fp8.quantize(a, (1, fp8.TILE))
    qb, sb = fp8.quantize(b, (fp8.TILE, fp8.TILE))
    exact = fp8.emulated_scaled_mm(qa, sa, (1, fp8.TILE), qb, sb, (fp8.TILE, fp8.TILE))
    got = fp8.scaled_matmul(a, b, (1, fp8.TILE), (fp8.TILE, fp8.TILE))
    out["gemm_rel_err_vs_emulation"] = ((got - exact).norm() / exact.norm()).item()
    out["gemm_rel_err_vs_fp32"] = ((got - a @ b.t()).norm() / (a @ b.t()).norm()).item()
    if kernel:
        reps = 20
        ab, bb = a.bfloat16(), b.bfloat16()
        t_bf16 = timed(lambda: [ab @ bb.t() for _ in range(reps)], device)[0] / reps
        t_fp8 = timed(lambda: [fp8._blockwise_scaled_mm_sm90(qa, sa, qb, sb, (fp8.TILE, fp8.TILE))
                               for _ in range(reps)], device)[0] / reps
        out.update(gemm_tflops_bf16=2 * n**3 / t_bf16 / 1e12, gemm_tflops_fp8=2 * n**3 / t_fp8 / 1e12)

    # training: the same init, the same batches, bf16 vs FP8 block-wise for `steps` steps
    name = "debug" if smoke else args.fp8_preset
    seq, batch = (32, 2) if smoke else (args.fp8_seq_len, args.fp8_batch)
    steps = 3 if smoke else args.fp8_steps
    cfg = preset(name, num_nextn_predict_layers=1, max_position_embeddings=max(seq + 1, 512))
    batches = [x.to(device) for x in markov_batches(cfg.vocab_size, batch, seq, steps)]
    torch.manual_seed(0)
    init = Transformer(cfg).train()
    curves, step_times = {}, {}
    for mode in ("bf16", "fp8"):
        model = copy.deepcopy(init).to(device)
        if mode == "fp8":
            out["fp8_modules"] = fp8.convert_to_float8(model, "blockwise")
        opt = adamw(model, device)
        losses, times = [], []
        for i, ids in enumerate(batches):
            t, loss = timed(lambda: train_step(model, opt, ids, bf16=True), device)
            losses.append(loss.item())
            if i >= 2:
                times.append(t)
        curves[mode], step_times[mode] = losses, statistics.median(times or [t])
        model = opt = None  # free both before the next mode's copy
        free(device)
    tail = max(1, min(10, steps // 4))
    end = {m: statistics.mean(c[-tail:]) for m, c in curves.items()}
    out.update(preset=name, seq_len=seq, micro_batch=batch, steps=steps,
               loss_start=curves["bf16"][0], loss_bf16=end["bf16"], loss_fp8=end["fp8"],
               loss_rel_diff=abs(end["fp8"] - end["bf16"]) / end["bf16"],
               step_s_bf16=step_times["bf16"], step_s_fp8=step_times["fp8"],
               fp8_over_bf16_speed=step_times["bf16"] / step_times["fp8"])
    out["within_v3_bound"] = out["loss_rel_diff"] <= 0.0025
    out["ok"] = out["gemm_rel_err_vs_emulation"] < 1e-3 and all(map(math.isfinite, end.values()))
    return out


# --- 4. inference --------------------------------------------------------------------------------------------
def check_inference(device: torch.device, smoke: bool, args: argparse.Namespace) -> dict[str, Any]:
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams

    name = "debug" if smoke else args.preset
    new, prompt_len = (8, 8) if smoke else (args.new_tokens, 32)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Transformer(preset(name, num_nextn_predict_layers=0)).eval()
    hf = to_hf(model, device, dtype).eval()
    model = model.to(device=device, dtype=dtype)
    out: dict[str, Any] = {"preset": name, "dtype": str(dtype).removeprefix("torch."), "new_tokens": new}
    for batch in ((1, 4) if smoke else (1, 64)):
        prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                               generator=torch.Generator().manual_seed(batch)).to(device)
        engine = Engine(model, max_batch=batch, max_len=prompt_len + new + 2)
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)

        def ours() -> Any:
            return engine.generate(prompt.tolist(), params)

        def theirs() -> Any:
            with torch.no_grad():
                return hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)

        ours(), theirs()  # warm up: kernels, allocator
        t_ours, t_hf = [], []
        for _ in range(1 if smoke else 3):  # alternate so that drifts hit both
            t_ours.append(timed(ours, device)[0])
            t_hf.append(timed(theirs, device)[0])
        ours_tps, hf_tps = batch * new / min(t_ours), batch * new / min(t_hf)
        out[f"b{batch}"] = {"ours_tokens_per_s": ours_tps, "peer_tokens_per_s": hf_tps,
                            "ours_over_peer": ours_tps / hf_tps}
    out["ok"] = True
    return out


# --- 5. distributed plumbing ---------------------------------------------------------------------------------
def check_distributed(device: torch.device, smoke: bool) -> dict[str, Any]:
    import torch.distributed as dist

    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard  # noqa: F401 - FSDP2 (torch >= 2.6)
    except ImportError as e:
        raise Skip(f"torch {torch.__version__} lacks FSDP2 / DCP ({e})") from e
    from nanoseek.train.parallelize import Parallel, parallelize

    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    out: dict[str, Any] = {"backend": backend}
    try:
        t = torch.ones(4, device=device)
        dist.all_reduce(t)
        out["all_reduce_ok"] = bool((t == 1).all().item())
        mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("dp",))
        par = Parallel("fsdp", 0, 1, 0, device, 1, mesh)
        cfg = preset("debug")
        batches = [x.to(device) for x in markov_batches(cfg.vocab_size, 2, 32, 4)]
        bf16 = device.type == "cuda"

        def build() -> tuple[Transformer, torch.optim.Optimizer]:
            torch.manual_seed(0)
            m = Transformer(cfg).to(device).train()
            parallelize(m, par, torch.bfloat16 if bf16 else None)
            return m, adamw(m, device)

        model, opt = build()
        for ids in batches[:2]:
            train_step(model, opt, ids, bf16=bf16)
        with tempfile.TemporaryDirectory() as d:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=d)
            expected = train_step(model, opt, batches[2], bf16=bf16).item()
            fresh, fresh_opt = build()
            msd, osd = get_state_dict(fresh, fresh_opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=d)
            set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            resumed = train_step(fresh, fresh_opt, batches[2], bf16=bf16).item()
        out.update(fsdp2=True, loss_after_save=expected, loss_after_load=resumed,
                   resume_rel_diff=abs(resumed - expected) / abs(expected))
        out["ok"] = out["all_reduce_ok"] and out["resume_rel_diff"] <= 1e-6
    finally:
        dist.destroy_process_group()
    return out


# --- the driver ----------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cpu_threads": torch.get_num_threads()}
    with contextlib.suppress(ImportError):
        import transformers
        env["transformers"] = transformers.__version__
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), sm=f"{p.major}.{p.minor}",
                   cuda=torch.version.cuda)
    return env


def summary(name: str, r: dict[str, Any]) -> str:
    """One table cell: the figures a reader wants from each part."""
    if r.get("status") != "ok":
        return r.get("why", "")
    pick = {
        "correctness": lambda: (f"logits Δ {r['logits_max_abs_diff']:.1e}; {r['train_steps']} steps max rel Δ "
                                f"{r['train_max_rel_diff']:.1e}; greedy identical {r['greedy_identical']}"),
        "mfu": lambda: (f"{r['preset']} B{r['micro_batch']}×{r['seq_len']}: {r['tokens_per_s']:.0f} tok/s, MFU "
                        f"{100 * r['mfu_vs_dense_peak']:.1f}% of 989T ({100 * r['mfu_vs_measured']:.1f}% of "
                        f"measured); ours/peer {r.get('ours_over_peer', float('nan')):.2f}x"),
        "fp8": lambda: (f"GEMM err {r['gemm_rel_err_vs_emulation']:.1e} (kernel {r['blockwise_kernel']}); step "
                        f"fp8/bf16 speed {r['fp8_over_bf16_speed']:.2f}x; loss Δ {100 * r['loss_rel_diff']:.3f}% "
                        f"after {r['steps']} steps"),
        "inference": lambda: "; ".join(f"{k.upper()} {v['ours_tokens_per_s']:.0f} vs {v['peer_tokens_per_s']:.0f} "
                                       f"tok/s ({v['ours_over_peer']:.2f}x)" for k, v in r.items()
                                       if isinstance(v, dict)),
        "distributed": lambda: (f"{r['backend']}: all_reduce {r['all_reduce_ok']}, FSDP2+DCP resume rel Δ "
                                f"{r['resume_rel_diff']:.1e}"),
    }
    try:
        return pick[name]()
    except (KeyError, TypeError, ValueError) as e:
        return f"(figures missing: {e})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script itself, measures nothing")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON results file")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=450.0, help="start no part after this many seconds")
    ap.add_argument("--preset", default="base", help="model preset of the MFU and inference parts (~0.7B)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[16, 8, 4, 2, 1],
                    help="micro-batches to try, largest first")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps (MFU part)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--fp8-preset", default="base")
    ap.add_argument("--fp8-seq-len", type=int, default=1024)
    ap.add_argument("--fp8-batch", type=int, default=4)
    ap.add_argument("--fp8-steps", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per sequence (inference part)")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)}; known: {', '.join(PARTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: this machine has no GPU torch can use (try --device cpu --smoke)")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    results: dict[str, Any] = {"environment": environment(device), "smoke": args.smoke, "parts": {}}
    runners = {"correctness": lambda: check_correctness(device, args.smoke),
               "mfu": lambda: check_mfu(device, args.smoke, args),
               "fp8": lambda: check_fp8(device, args.smoke, args),
               "inference": lambda: check_inference(device, args.smoke, args),
               "distributed": lambda: check_distributed(device, args.smoke)}
    start = time.perf_counter()
    for name in parts:
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.perf_counter()
        if t0 - start > args.budget_s:
            r = {"status": "skipped", "why": f"budget of {args.budget_s:.0f} s spent"}
        else:
            try:
                r = {"status": "ok", **runners[name]()}
                if not r.pop("ok", True):
                    r["status"] = "failed"
                    r["why"] = "a check is outside its bound (see the figures)"
            except Skip as e:
                r = {"status": "skipped", "why": str(e)}
            except Exception as e:  # noqa: BLE001 - one part's failure must not stop the others
                r = {"status": "error", "why": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                     "traceback": traceback.format_exc(limit=8)}
            free(device)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results["parts"][name] = r
        write_json(args.out, _jsonable(results))
        print(f"[gpu_check] {name}: {r['status']} in {r['seconds']} s", flush=True)

    env = results["environment"]
    print(f"\nmachine: {env.get('gpu', 'CPU')} · torch {env['torch']} · transformers {env.get('transformers', '-')}")
    print("| part | status | s | figures |\n|---|---|---|---|")
    for name, r in results["parts"].items():
        text = summary(name, r) if r["status"] == "ok" else r.get("why", "")
        if r["status"] == "failed":
            text = f"{r['why']}: " + summary(name, {**r, "status": "ok"})
        print(f"| {name} | {r['status']} | {r['seconds']} | {text} |")
    print(f"results: {args.out}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in results["parts"].values()) else 1


def _jsonable(x: Any) -> Any:
    """Results as strict JSON: non-finite floats become strings."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


if __name__ == "__main__":
    sys.exit(main())
