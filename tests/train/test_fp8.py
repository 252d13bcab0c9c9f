"""FP8 quantisation error bounds, the emulated block-wise GEMM against fp32, the row-wise path against
torch._scaled_mm, and the autograd function's three GEMMs against their exact FP8 definitions."""

import pytest
import torch
from torch import nn

from nanoseek.model import Transformer, preset
from nanoseek.train.fp8 import (
    FP8,
    RECIPES,
    Float8GroupedExperts,
    Float8Linear,
    convert_to_float8,
    dequantize,
    emulated_scaled_mm,
    float8_matmul,
    quantize,
    scaled_matmul,
)

# E4M3 keeps 3 mantissa bits: round-to-nearest is within 2^-4 relative for normals; below the smallest normal
# (2^-6) the spacing is 2^-9, so the absolute error there is at most 2^-10 (in units of the block scale).
REL, SUBNORMAL_ABS = 2.0**-4, 2.0**-10


def heavy_tailed(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x * torch.exp(2 * torch.randn(*shape, generator=g))  # magnitudes over ~6 orders


@pytest.mark.parametrize("shape,block", [((37, 300), (1, 128)), ((300, 260), (128, 128)),
                                         ((5, 77), (1, 1 << 62))])
def test_quantisation_error_is_within_e4m3_rounding_of_each_block(shape, block):
    x = heavy_tailed(*shape)
    q, scale = quantize(x, block)
    assert q.dtype == FP8 and q.shape == x.shape
    br, bc = min(block[0], shape[0]), min(block[1], shape[1])
    assert scale.shape == (-(-shape[0] // br), -(-shape[1] // bc))
    back = dequantize(q, scale, block)
    s = scale.repeat_interleave(br, 0)[: shape[0]].repeat_interleave(bc, 1)[:, : shape[1]]
    bound = torch.maximum(x.abs() * REL, s * SUBNORMAL_ABS)
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    # each block's largest magnitude lands on E4M3's maximum, so no block wastes range
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = q[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float().abs()
            assert tile.max() == 448.0


def test_an_outlier_only_coarsens_its_own_tile():
    x = torch.randn(4, 256)
    x_out = x.clone()
    x_out[0, 3] = 1e4
    q1, s1 = quantize(x, (1, 128))
    q2, s2 = quantize(x_out, (1, 128))
    changed = (s1 != s2).nonzero().tolist()
    assert changed == [[0, 0]]
    assert torch.equal(q1.float()[:, 128:], q2.float()[:, 128:])
    assert torch.equal(q1.float()[1:], q2.float()[1:])


def test_zero_blocks_quantise_to_zero():
    q, s = quantize(torch.zeros(3, 130), (1, 128))
    assert torch.isfinite(s).all() and (dequantize(q, s, (1, 128)) == 0).all()


def test_emulated_blockwise_matmul_against_fp32_reference():
    a, b = heavy_tailed(64, 384, seed=1), heavy_tailed(96, 384, seed=2)
    qa, sa = quantize(a, (1, 128))
    qb, sb = quantize(b, (128, 128))
    out = emulated_scaled_mm(qa, sa, (1, 128), qb, sb, (128, 128))
    # exact: the emulation is the float64 product of the dequantised operands up to fp32 accumulation
    exact = dequantize(qa, sa, (1, 128)).double() @ dequantize(qb, sb, (128, 128)).double().t()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    # against the unquantised product: each term carries at most (1+ε)² - 1 relative error (+ subnormals)
    ref = a.double() @ b.double().t()
    bound = (a.abs().double() @ b.abs().double().t()) * (2 * REL + REL**2) + 1e-3
    assert ((out.double() - ref).abs() <= bound).all()
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_rowwise_path_matches_torch_scaled_mm_and_the_exact_definition():
    a, b = torch.randn(33, 200), torch.randn(17, 200)
    out = scaled_matmul(a, b, (1, 1 << 62), (1, 1 << 62))
    qa, sa = quantize(a, (1, 1 << 62))
    qb, sb = quantize(b, (1, 1 << 62))
    assert sa.shape == (33, 1) and sb.shape == (17, 1)
    ref = torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.float32)
    assert torch.equal(out, ref)
    exact = dequantize(qa, sa, (1, 1 << 62)).double() @ dequantize(qb, sb, (1, 1 << 62)).double().t()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["blockwise", "rowwise"])
def test_float8_matmul_three_gemms_follow_the_recipe(recipe):
    r = RECIPES[recipe]
    x = torch.randn(50, 300, requires_grad=True)
    w = (torch.randn(130, 300) * 0.02).requires_grad_()
    y = float8_matmul(x, w, r)
    dy = torch.randn(50, 130)
    y.backward(dy)

    def fp8(a, b, ba, bb):  # independent definition: quantise, dequantise, float64 matmul
        qa, sa = quantize(a.detach(), ba)
        qb, sb = quantize(b.detach(), bb)
        return (dequantize(qa, sa, ba).double() @ dequantize(qb, sb, bb).double().t()).float()

    torch.testing.assert_close(y, fp8(x, w, r.x, r.w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, fp8(dy, w.t(), r.dy, r.w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, fp8(dy.t(), x.t(), r.dy_t, r.x_t), rtol=1e-5, atol=1e-4)
    # and all three stay close to the fp32 GEMMs
    assert (y - x @ w.t()).norm() / (x @ w.t()).norm() < 0.06
    assert (x.grad - dy @ w).norm() / (dy @ w).norm() < 0.06
    assert (w.grad - dy.t() @ x).norm() / (dy.t() @ x).norm() < 0.06


def test_float8_matmul_under_bf16_autocast_returns_bf16_and_fp32_weight_grad():
    x = torch.randn(8, 64, requires_grad=True)
    w = torch.randn(32, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = float8_matmul(x, w, RECIPES["blockwise"])
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_convert_to_float8_skips_head_gate_embedding_and_keeps_parameters():
    torch.manual_seed(0)
    model = Transformer(preset("debug"))
    before = {n: p for n, p in model.named_parameters()}
    n = convert_to_float8(model, "blockwise")
    assert {n: p for n, p in model.named_parameters()} == before  # same objects, same names
    assert type(model.head) is nn.Linear and isinstance(model.embed, nn.Embedding)
    for moe in model.moe_layers():
        assert not isinstance(moe.gate, nn.Linear) and isinstance(moe.experts, Float8GroupedExperts)
    linears = [m for m in model.modules() if isinstance(m, Float8Linear)]
    assert n == len(linears) + len(model.moe_layers())
    assert isinstance(model.blocks[0].attn.kv_b_proj, Float8Linear)


def test_float8_model_loss_and_gradients_are_close_to_fp32():
    torch.manual_seed(0)
    ref = Transformer(preset("debug"))
    fp8 = Transformer(preset("debug"))
    fp8.load_state_dict(ref.state_dict())
    convert_to_float8(fp8)
    ids = torch.randint(0, 512, (2, 33))
    l_ref = ref.loss(ids[:, :-1], ids[:, 1:])
    l_fp8 = fp8.loss(ids[:, :-1], ids[:, 1:])
    assert abs(l_fp8.item() - l_ref.item()) / l_ref.item() < 2e-3
    l_fp8.backward()
    l_ref.backward()
    params = zip(fp8.parameters(), ref.parameters(), strict=True)
    pairs = [(p.grad, q.grad) for p, q in params if q.grad is not None]
    assert all(g is not None for g, _ in pairs)
    g8, g32 = torch.cat([g.flatten() for g, _ in pairs]), torch.cat([g.flatten() for _, g in pairs])
    assert (g8 - g32).norm() / g32.norm() < 0.05


def test_an_fp8_model_trains_under_bf16_autocast():
    """The routed experts' FP8 GEMMs return autocast's bf16 while the residual stream is fp32: the combine must
    take the GEMMs' dtype (bench/gpu_check.py found this on its first CPU run)."""
    torch.manual_seed(0)
    model = Transformer(preset("debug"))
    assert convert_to_float8(model, "blockwise") > 0
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    experts = model.blocks[1].ffn.experts
    assert torch.isfinite(loss) and experts.gate_up_proj.grad.abs().sum() > 0 and experts.down_proj.grad.isfinite().all()
