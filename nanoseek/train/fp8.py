"""FP8 training following DeepSeek-V3 §3.3: E4M3 everywhere, made accurate by fine-grained scaling.

Every linear GEMM (forward `y = x Wᵀ`, input gradient `dx = dy W`, weight gradient `dW = dyᵀ x`) runs on E4M3
operands. An operand is cut into blocks along the contraction dimension and each block gets its own scale from
its online max (`scale = amax / 448`, `q = fp8(x / scale)`), so one outlier only coarsens its own block:

    recipe "blockwise" (DeepSeek-V3)            recipe "rowwise"
    activations, output grads: 1×128 tiles      one scale per row (per token / per channel)
    weights:                   128×128 blocks   one scale per row of the contraction
    -> SM90 GPUs: torch's block-wise scaled mm  -> `torch._scaled_mm` (also on CPU)
    -> elsewhere: exact emulation (dequantise, fp32 matmul)

The weight-gradient GEMM contracts over tokens, so there the tiles run along the token dimension (DeepSeek's
"128×1" activation tiles). Master weights, gradients and the optimiser stay fp32; the embedding, output head,
MoE gate, norms and the attention core are never converted (see `convert_to_float8`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import GroupedExperts

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0
TILE = 128
Block = tuple[int, int]  # (rows, cols) covered by one scale; cols run along the contraction dimension


# --- quantisation -------------------------------------------------------------------------------------------
def quantize(t: torch.Tensor, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] -> (q [R, C] float8_e4m3fn, scale [⌈R/br⌉, ⌈C/bc⌉] fp32) with t ≈ q · scale block by block.

    The scale maps each block's max magnitude onto E4M3's largest value 448, the formula of DeepSeek's
    `act_quant`/`weight_quant` kernels. Ragged edge blocks are zero-padded, which leaves their max unchanged.
    """
    R, C = t.shape
    br, bc = min(block[0], R), min(block[1], C)
    nr, nc = -(-R // br), -(-C // bc)
    padded = F.pad(t.float(), (0, nc * bc - C, 0, nr * br - R))
    blocks = padded.view(nr, br, nc, bc)
    amax = blocks.abs().amax(dim=(1, 3))  # [nr, nc]
    scale = amax.clamp_min(1e-12) / FP8_MAX  # a zero block gets a tiny scale and quantises to exact zeros
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nr * br, nc * bc)[:R, :C], scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: Block) -> torch.Tensor:
    """Inverse of `quantize`: q [R, C] fp8, scale [⌈R/br⌉, ⌈C/bc⌉] -> fp32 [R, C]."""
    R, C = q.shape
    br, bc = min(block[0], R), min(block[1], C)
    expanded = scale.repeat_interleave(br, 0)[:R].repeat_interleave(bc, 1)[:, :C]
    return q.float() * expanded


# --- scaled matmul ------------------------------------------------------------------------------------------
def scaled_matmul(a: torch.Tensor, b: torch.Tensor, block_a: Block, block_b: Block) -> torch.Tensor:
    """a [M, K] @ b [N, K]ᵀ -> fp32 [M, N], both operands quantised to E4M3 with the given scale blocks."""
    qa, sa = quantize(a, block_a)
    qb, sb = quantize(b, block_b)
    if sa.shape == (a.shape[0], 1) and sb.shape == (b.shape[0], 1) and _rowwise_supported(a, b):
        # One scale per row of each operand: the layout `torch._scaled_mm` accepts on every device.
        out_dtype = torch.bfloat16 if a.is_cuda else torch.float32  # CUDA's row-wise kernel writes bf16
        return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=out_dtype).float()
    if _blockwise_supported(a, b, block_a, block_b):
        return _blockwise_scaled_mm_sm90(qa, sa, qb, sb, block_b)
    return emulated_scaled_mm(qa, sa, block_a, qb, sb, block_b)


def emulated_scaled_mm(qa: torch.Tensor, sa: torch.Tensor, block_a: Block,
                       qb: torch.Tensor, sb: torch.Tensor, block_b: Block) -> torch.Tensor:
    """Exact emulation of a scaled FP8 GEMM: dequantise each block, multiply-accumulate in fp32. -> [M, N]."""
    return dequantize(qa, sa, block_a) @ dequantize(qb, sb, block_b).t()


def _rowwise_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.is_cuda:
        return True  # the CPU kernel takes any shape
    sm = torch.cuda.get_device_capability(a.device)
    return a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and sm >= (8, 9)


def _blockwise_supported(a: torch.Tensor, b: torch.Tensor, block_a: Block, block_b: Block) -> bool:
    """cuBLAS block-scaled FP8 (CUDA ≥ 12.9): SM90, 1×128 × {1×128, 128×128}, K and N multiples of 128."""
    return (a.is_cuda and hasattr(F, "scaled_mm") and torch.cuda.get_device_capability(a.device) == (9, 0)
            and block_a == (1, TILE) and block_b in ((1, TILE), (TILE, TILE))
            and a.shape[1] % TILE == 0 and b.shape[0] % TILE == 0)


def _blockwise_scaled_mm_sm90(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor,
                              block_b: Block) -> torch.Tensor:
    """torch.nn.functional.scaled_mm with DeepSeek's block scales, laid out as cuBLAS wants them.

    1×128 scales [rows, K/128] must be row-index-major (stride (1, rows)); 128×128 scales are passed as
    [L4, N/128] with L = K/128 padded to a multiple of 4 (cuBLAS' 2-D block-scaling layout).
    """
    scale_a = sa.t().contiguous().t()
    if block_b == (TILE, TILE):
        L = sb.shape[1]
        scale_b = F.pad(sb, (0, -L % 4)).t()
        recipe_b = F.ScalingType.BlockWise128x128
    else:
        scale_b = sb.t().contiguous().t()
        recipe_b = F.ScalingType.BlockWise1x128
    out = F.scaled_mm(qa, qb.t(), scale_a, F.ScalingType.BlockWise1x128, scale_b, recipe_b,
                      output_dtype=torch.float32)
    return out.float()


# --- autograd -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """Scale blocks of the six operands of one linear layer's three GEMMs (cols = contraction dimension)."""

    name: str
    x: Block  # forward:   x [M, K]
    w: Block  # forward:   W [N, K];  input grad: Wᵀ [K, N]
    dy: Block  # input grad: dy [M, N]
    dy_t: Block  # weight grad: dyᵀ [N, M] (contraction over the M tokens)
    x_t: Block  # weight grad: xᵀ [K, M]


ROW = (1, 1 << 62)  # one scale for a whole row, whatever its length
RECIPES = {
    "blockwise": Recipe("blockwise", x=(1, TILE), w=(TILE, TILE), dy=(1, TILE),
                        dy_t=(1, TILE), x_t=(1, TILE)),
    "rowwise": Recipe("rowwise", x=ROW, w=ROW, dy=ROW, dy_t=ROW, x_t=ROW),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


class _Float8Matmul(torch.autograd.Function):
    """x [M, K] @ W [N, K]ᵀ with all three GEMMs in FP8. Inputs are saved in their own precision and
    quantised again in backward with the tiling each GEMM needs (the weight gradient tiles along tokens)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: Recipe,
                out_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.recipe = recipe
        with torch.autocast(x.device.type, enabled=False):  # the emulated GEMM must stay fp32
            return scaled_matmul(x, weight, recipe.x, recipe.w).to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        x, weight = ctx.saved_tensors
        r = ctx.recipe
        with torch.autocast(dy.device.type, enabled=False):
            dx = scaled_matmul(dy, weight.t(), r.dy, r.w)  # [M, N] @ [K, N]ᵀ -> [M, K]
            dw = scaled_matmul(dy.t(), x.t(), r.dy_t, r.x_t)  # [N, M] @ [K, M]ᵀ -> [N, K]
        return dx.to(x.dtype), dw.to(weight.dtype), None, None


def float8_matmul(x: torch.Tensor, weight: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """x [..., K] @ weight [N, K]ᵀ -> [..., N] in FP8; the result has autocast's dtype when autocast is on."""
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    y = _Float8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, recipe, out_dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


# --- module swaps -------------------------------------------------------------------------------------------
class Float8Linear(nn.Linear):
    """nn.Linear whose matmuls run in FP8; the parameter stays the fp32 master weight (same object)."""

    recipe: Recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = float8_matmul(x, self.weight, self.recipe)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.recipe.name}"


class Float8GroupedExperts(GroupedExperts):
    """Routed experts whose two GEMMs per expert run in FP8 (weight blocks never straddle two experts)."""

    recipe: Recipe

    def run_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, D] rows grouped by expert, counts [E] -> [M, D]."""
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            h = float8_matmul(x_sorted[start:start + n], self.gate_up_proj[e], self.recipe)  # [n, 2I]
            gate, up = h.split(self.hidden, dim=-1)
            outs.append(float8_matmul(F.silu(gate) * up, self.down_proj[e], self.recipe))  # [n, D]
            start += n
        return torch.cat(outs) if outs else x_sorted.new_zeros(0, x_sorted.shape[1])


# Module names kept in high precision: the output head (+ MTP heads that share it) and the MoE router.
# Embeddings, norms and the attention core are not nn.Linear, so they are never converted anyway.
HIGH_PRECISION = ("head", "gate")


def convert_to_float8(model: nn.Module, recipe: str = "blockwise",
                      skip: tuple[str, ...] = HIGH_PRECISION) -> int:
    """Switch every nn.Linear and routed-expert group of `model` to FP8 in place; returns how many.

    A module is skipped when the last component of its name is in `skip`. Modules change class in place (the
    same objects, Parameters and names), so state dicts and checkpoints are unaffected. Call it before
    `parallelize`, which builds expert parallelism on top of whichever experts class it finds.
    """
    r = get_recipe(recipe)
    converted = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in skip:
            continue
        if type(module) is nn.Linear:
            module.__class__ = Float8Linear
        elif type(module) is GroupedExperts:
            module.__class__ = Float8GroupedExperts
        else:
            continue
        module.recipe = r
        converted += 1
    return converted
