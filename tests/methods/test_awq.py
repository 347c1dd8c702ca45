"""AWQ: unit scales equal RTN, the search never loses to RTN, folding is exact, real layers."""

import pytest
import torch
from smollm2_layers import real_layers  # noqa: F401  (fixture)

from bitplan.methods.awq import (
    awq_scales,
    clip_weight,
    effective_weight,
    fold_scales_into_norm,
    fold_scales_into_previous_linear,
    output_error,
    quantize_awq,
    scale_weight_inputs,
)
from bitplan.methods.calibration_stats import InputStats, relative_output_error
from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import Scheme
from bitplan.models.smoothing import smoothing_groups

SCHEME = Scheme("awq", 4, 64, False)


def outlier_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Activations with a few large channels, the situation AWQ is designed for."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.ones(features)
    magnitude[torch.randperm(features, generator=g)[: features // 32]] = 20.0
    return torch.randn(tokens, features, generator=g) * magnitude


def stats_of(x: torch.Tensor) -> InputStats:
    stats = InputStats(x.shape[1])
    stats.add(x)
    return stats


def test_alpha_zero_gives_unit_scales_and_rtn():
    x = outlier_inputs(512, 128)
    stats = stats_of(x)
    assert torch.equal(awq_scales(stats.mean_abs(), 0.0), torch.ones(128))
    weight = torch.randn(32, 128)
    result = quantize_awq([weight], stats.mean_abs(), stats.second_moment(), SCHEME, clip=False, n_grid=1)
    rtn = quantize_rtn(weight, SCHEME)
    assert result.alpha == 0.0
    assert torch.equal(result.quantized[0].codes, rtn.codes) and torch.equal(result.quantized[0].scale, rtn.scale)


def test_scales_normalised_geometrically():
    scales = awq_scales(torch.tensor([0.5, 2.0, 8.0, 1.0]), 0.5)
    assert float(scales.max() * scales.min()) == pytest.approx(1.0)


def test_search_never_loses_to_rtn_and_wins_with_outlier_channels():
    x = outlier_inputs(4096, 256, seed=1)
    stats = stats_of(x)
    weights = [torch.randn(64, 256, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    result = quantize_awq(weights, stats.mean_abs(), stats.second_moment(), SCHEME, clip=False)
    assert min(result.losses) <= result.losses[0]  # index 0 is α = 0, i.e. RTN
    assert result.alpha > 0
    rtn = sum(output_error(w - quantize_rtn(w, SCHEME).dequantize(), stats.second_moment()) for w in weights)
    awq = sum(output_error(w - effective_weight(q, result.scales), stats.second_moment())
              for w, q in zip(weights, result.quantized))
    assert awq < 0.8 * rtn
    assert min(result.losses) == pytest.approx(awq, rel=1e-6)


def test_clip_search_never_raises_group_error():
    x = outlier_inputs(2048, 128, seed=4)
    moment = stats_of(x).second_moment()
    weight = torch.distributions.StudentT(2.5).sample((32, 128))
    clipped = clip_weight(weight, moment, SCHEME)
    assert output_error(weight - quantize_rtn(clipped, SCHEME).dequantize(), moment) <= output_error(
        weight - quantize_rtn(weight, SCHEME).dequantize(), moment
    ) * 1.0001
    assert clipped.abs().max() <= weight.abs().max()


def test_folding_keeps_the_function():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(7, 64, generator=g)
    norm_weight, weight = torch.randn(64, generator=g), torch.randn(16, 64, generator=g)
    scales = torch.rand(64, generator=g) + 0.5
    new_norm, _ = fold_scales_into_norm(norm_weight, scales)
    torch.testing.assert_close((hidden * new_norm) @ scale_weight_inputs(weight, scales).T, (hidden * norm_weight) @ weight.T)
    up, bias = torch.randn(64, 32, generator=g), torch.randn(64, generator=g)
    new_up, new_bias = fold_scales_into_previous_linear(up, bias, scales)
    inner = torch.randn(5, 32, generator=g)
    torch.testing.assert_close((inner @ new_up.T + new_bias) @ scale_weight_inputs(weight, scales).T,
                               (inner @ up.T + bias) @ weight.T, rtol=1e-4, atol=1e-4)


def test_llama_smoothing_groups_come_from_the_architecture_table():
    groups = smoothing_groups("llama", num_heads=9, num_kv_heads=3)
    assert [(g.previous, g.linears) for g in groups] == [
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ]
    assert any(g.previous == "self_attn.v_proj" for g in smoothing_groups("llama", num_heads=8, num_kv_heads=8))


@pytest.mark.slow
def test_real_layers_awq_beats_rtn_on_median(real_layers):
    """AWQ lowers held-out error on the real up_proj and down_proj (3 and 4 bits)."""
    for name in ("model.layers.3.mlp.up_proj", "model.layers.3.mlp.down_proj"):
        weight, calib, held = real_layers[name]
        for bits in (3, 4):
            scheme = Scheme("awq", bits, 128 if weight.shape[1] % 128 == 0 else 64, False)
            result = quantize_awq([weight], calib.mean_abs(), calib.second_moment(), scheme)
            awq = relative_output_error(weight, effective_weight(result.quantized[0], result.scales), held.second_moment())
            rtn = relative_output_error(weight, quantize_rtn(weight, scheme).dequantize(), held.second_moment())
            assert awq < rtn, (name, bits, awq, rtn)


def test_awq_then_gptq_keeps_the_scales_and_lowers_the_output_error():
    """``awqgptq``: AWQ's scale search unchanged, then GPTQ on the scaled weights, which must fit
    the calibration output better than AWQ's clip-and-round (and decode on the same grid)."""
    from bitplan.methods.registry import quantize_smoothing_group

    g = torch.Generator().manual_seed(4)
    # correlated channels, as real activations have (GPTQ's error feedback needs them), a few large
    x = (torch.randn(1024, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.3 * torch.randn(1024, 128, generator=g))
    x = x * outlier_inputs(1, 128, seed=3).abs().clamp_min(1.0)
    weights = {"up": torch.randn(96, 128, generator=g), "gate": torch.randn(64, 128, generator=g)}
    stats = stats_of(x)
    for bits in (3, 4):
        awq = quantize_smoothing_group(weights, Scheme("awq", bits, 64, True), torch.bfloat16, stats)
        both = quantize_smoothing_group(weights, Scheme.parse(f"awqgptq-w{bits}g64s"), torch.bfloat16, stats)
        assert torch.equal(both.scales, awq.scales) and both.alpha == awq.alpha
        for name, weight in weights.items():
            codes = both.quantized[name].codes
            assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
            fitted = output_error(weight - effective_weight(both.quantized[name], both.scales), stats.second_moment())
            rounded = output_error(weight - effective_weight(awq.quantized[name], awq.scales), stats.second_moment())
            assert fitted < 0.9 * rounded, (bits, name, fitted, rounded)


@pytest.mark.slow
def test_real_layers_awq_then_gptq_beats_awq_at_4_bits_and_matches_gptq(real_layers):
    """Held-out output error of real Linears: AWQ + GPTQ below AWQ at 4 bits, and never more than
    0.5% above plain GPTQ at 3 and 4 bits (measured: 0.0856 / 0.0898 / 0.0728 against AWQ's 0.0918 /
    0.0931 / 0.0831 at 4 bits; at 3 bits AWQ's clip is ahead on up and down)."""
    from bitplan.methods.registry import quantize, quantize_smoothing_group

    for name in ("model.layers.3.mlp.up_proj", "model.layers.3.mlp.down_proj", "model.layers.3.self_attn.o_proj"):
        weight, calib, held = real_layers[name]
        for bits in (3, 4):
            errors = {}
            for method in ("awq", "awqgptq"):
                result = quantize_smoothing_group({"w": weight}, Scheme(method, bits, 64, True), torch.bfloat16, calib)
                errors[method] = relative_output_error(weight, effective_weight(result.quantized["w"], result.scales), held.second_moment())
            plain = quantize(weight, Scheme("gptq", bits, 64, True), torch.bfloat16, {"input": calib}).dequantize()
            errors["gptq"] = relative_output_error(weight, plain, held.second_moment())
            assert errors["awqgptq"] < 1.005 * errors["gptq"], (name, bits, errors)
            if bits == 4:
                assert errors["awqgptq"] < errors["awq"], (name, bits, errors)


def test_awq_then_imatrix_keeps_the_scales_and_is_imatrix_where_nothing_folds():
    """``awqimatrix``: AWQ's scale search unchanged, then the importance-weighted search on the scaled
    weights; where no op can take the scales (o_proj under grouped-query attention) it is plain imatrix."""
    from bitplan.methods.imatrix import quantize_imatrix
    from bitplan.methods.registry import quantize_smoothing_group

    g = torch.Generator().manual_seed(5)
    x = torch.randn(512, 128, generator=g) * outlier_inputs(1, 128, seed=3).abs().clamp_min(1.0)
    weights = {"up": torch.randn(96, 128, generator=g), "gate": torch.randn(64, 128, generator=g)}
    stats = stats_of(x)
    for bits in (3, 4):
        awq = quantize_smoothing_group(weights, Scheme("awq", bits, 64, True), torch.bfloat16, stats)
        both = quantize_smoothing_group(weights, Scheme.parse(f"awqimatrix-w{bits}g64s"), torch.bfloat16, stats)
        assert torch.equal(both.scales, awq.scales) and both.alpha == awq.alpha
        for name, weight in weights.items():
            codes = both.quantized[name].codes
            assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
            searched = output_error(weight - effective_weight(both.quantized[name], both.scales), stats.second_moment())
            rounded = output_error(weight - effective_weight(awq.quantized[name], awq.scales), stats.second_moment())
            assert searched < rounded, (bits, name, searched, rounded)
        alone = quantize_smoothing_group({"o": weights["up"]}, Scheme.parse(f"awqimatrix-w{bits}g64s"), torch.bfloat16, stats,
                                         foldable=False)
        assert torch.equal(alone.scales, torch.ones(128))
        plain = quantize_imatrix(weights["up"], Scheme.parse(f"imatrix-w{bits}g64s"), torch.diagonal(stats.second_moment()), torch.bfloat16)
        assert torch.equal(alone.quantized["o"].dequantize(), plain.dequantize())


@pytest.mark.slow
def test_real_layers_awq_then_imatrix_beats_both_alone_on_held_out_tokens(real_layers):
    """Held-out output error of five real Linears (g64): AWQ + imatrix below imatrix alone and below AWQ at 3
    and 4 bits (measured: 0.49x / 0.56x of RTN's error, imatrix 0.54x / 0.59x, AWQ 0.65x / 0.71x)."""
    from bitplan.methods.registry import quantize, quantize_smoothing_group

    for bits in (3, 4):
        totals = {"awq": 0.0, "imatrix": 0.0, "awqimatrix": 0.0}
        for name, (weight, calib, held) in real_layers.items():
            for method in ("awq", "awqimatrix"):
                result = quantize_smoothing_group({"w": weight}, Scheme.parse(f"{method}-w{bits}g64s"), torch.bfloat16, calib)
                totals[method] += relative_output_error(weight, effective_weight(result.quantized["w"], result.scales), held.second_moment())
            alone = quantize(weight, Scheme.parse(f"imatrix-w{bits}g64s"), torch.bfloat16, {"input": calib}).dequantize()
            totals["imatrix"] += relative_output_error(weight, alone, held.second_moment())
        assert totals["awqimatrix"] < totals["imatrix"] < totals["awq"], (bits, totals)
