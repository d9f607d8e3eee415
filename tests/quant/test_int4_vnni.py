"""The INT4 x INT8-activation (VNNI) kernel against its oracle: dequantise-then-matmul fed the same
INT8-rounded activations; plus the x16 layout round trip and the engine using it by default."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from frugal.quant.int4 import (dequantize_int4, from_x16_layout, pack_nibbles, quantize_int4,
                               round_activations_int8, to_x16_layout)


@pytest.fixture(scope="module")
def vnni_ops(cpu_ops):
    if not cpu_ops.has_vnni_path():
        pytest.skip("this CPU lacks AVX512-VNNI")
    return cpu_ops


def test_x16_layout_round_trips():
    for rows in (16, 48):
        qweight = pack_nibbles(torch.randint(0, 16, (rows, 192), dtype=torch.uint8))
        scales = torch.randn(rows, 6).half()
        zeros = torch.randint(0, 16, (rows, 6), dtype=torch.uint8)
        x16 = to_x16_layout(qweight, scales, zeros)
        assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(x16, (qweight, scales, zeros)))
        assert not torch.equal(x16[0], qweight)  # really repacked
        back = from_x16_layout(*x16)
        assert torch.equal(back[0], qweight) and torch.equal(back[1], scales) and torch.equal(back[2], zeros)


def test_activation_rounding_reference():
    x = torch.tensor([[0.0] * 31 + [1.27], [-2.54] + [0.0] * 31]).repeat(1, 2)[:, :50]
    y = round_activations_int8(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x)  # the block maximum and zeros are exact
    x = torch.randn(3, 100)
    err = (round_activations_int8(x) - x).abs()
    blocks = F.pad(x, (0, 28)).view(3, -1, 32).abs().amax(-1).repeat_interleave(32, 1)[:, :100]
    assert bool((err <= blocks / 254 + 1e-7).all())  # at most half a step of max|x| / 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size,scheme,in_features", [(32, "sym", 128), (64, "asym", 192), (128, "sym", 576),
                                                           (128, "asym", 172), (32, "asym", 64)])
@pytest.mark.parametrize("num_rows", [1, 3, 6, 40])
def test_vnni_kernel_matches_oracle_on_rounded_activations(vnni_ops, dtype, group_size, scheme, in_features,
                                                           num_rows):
    torch.manual_seed(num_rows)
    out_features = 48
    packed = quantize_int4(torch.randn(out_features, in_features) * 0.05, group_size, scheme)
    weight = dequantize_int4(packed.qweight, packed.scales, packed.qzeros, group_size, in_features).double()
    x = torch.randn(num_rows, in_features).to(dtype)
    bias = (torch.randn(out_features) * 0.1).to(dtype)
    qweight, scales, qzeros = to_x16_layout(packed.qweight, packed.scales, packed.qzeros)
    y = vnni_ops.int4_x16_linear(x, qweight, scales, qzeros, group_size, bias, 2**62)
    assert y.dtype == dtype and y.shape == (num_rows, out_features)
    # Integer dot products are exact: only fp32 summation order (and bf16 output rounding) differ.
    expected = round_activations_int8(x).double() @ weight.t() + bias.double()
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(y.double(), expected, **tolerance)
    # Against unrounded activations the error is the rounding's, small next to the output.
    exact = x.double() @ weight.t() + bias.double()
    assert (y.double() - exact).norm() < 0.02 * exact.norm()
    # Above max_gemv_rows the kernel dequantises for the BLAS and keeps activations exact.
    y_blas = vnni_ops.int4_x16_linear(x, qweight, scales, qzeros, group_size, bias, 0)
    torch.testing.assert_close(y_blas.double(), F.linear(x.float(), weight.float().to(dtype).float(),
                                                         bias.float()).double(),
                               **(dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)))


def test_vnni_dequantize_is_exact(vnni_ops):
    packed = quantize_int4(torch.randn(32, 256), 64, "asym")
    weight = dequantize_int4(packed.qweight, packed.scales, packed.qzeros, 64, 256)
    x16 = to_x16_layout(packed.qweight, packed.scales, packed.qzeros)
    assert torch.equal(vnni_ops.int4_x16_dequantize(*x16, 64, torch.float32), weight)


def test_vnni_kernel_rejects_bad_shapes(vnni_ops):
    packed = quantize_int4(torch.randn(20, 64), 32, "sym")  # 20 rows: not a multiple of 16
    with pytest.raises(RuntimeError, match="16"):
        vnni_ops.int4_x16_linear(torch.randn(1, 64), packed.qweight, packed.scales, None, 32, None, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 5, 40])
def test_int8_vnni_kernel_matches_oracle_on_rounded_activations(vnni_ops, dtype, num_rows):
    from frugal.quant.int8 import dequantize_int8, from_x16_layout as int8_from_x16, quantize_int8
    from frugal.quant.int8 import to_x16_layout as int8_to_x16

    torch.manual_seed(num_rows)
    packed = quantize_int8(torch.randn(32, 96))
    weight = dequantize_int8(packed.qweight, packed.scales).double()
    tiled = int8_to_x16(packed.qweight)
    assert torch.equal(int8_from_x16(tiled), packed.qweight) and not torch.equal(tiled, packed.qweight)
    x = torch.randn(num_rows, 96).to(dtype)
    y = vnni_ops.int8_x16_linear(x, tiled, packed.scales, None, 2**62)
    assert y.dtype == dtype and y.shape == (num_rows, 32)
    expected = round_activations_int8(x).double() @ weight.t()
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(y.double(), expected, **tolerance)
    y_blas = vnni_ops.int8_x16_linear(x, tiled, packed.scales, None, 0)  # dequantise + BLAS: exact activations
    oracle = F.linear(x.float(), weight.float().to(dtype).float()).double()  # the BLAS multiplies dtype weights
    torch.testing.assert_close(y_blas.double(), oracle,
                               **(dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)))


@pytest.mark.parametrize("bits", [4, 8])
def test_vnni_kernels_shared_by_two_threads_in_stream_order_match_one_thread(vnni_ops, bits):
    """Matrices past the sharing threshold run on the helper threads too, each thread taking a contiguous
    range of chunks (WorkSharing::run_streams): every output row is written once, whatever the thread count."""
    from frugal.quant.int8 import quantize_int8
    from frugal.quant.int8 import to_x16_layout as int8_to_x16

    torch.manual_seed(bits)
    out_features, in_features = 1040, 512  # 65 tiles of 16 rows: odd chunk counts; 266 KiB of INT4 weights
    if bits == 4:
        packed = quantize_int4(torch.randn(out_features, in_features) * 0.05, 32, "sym")
        weight = dequantize_int4(packed.qweight, packed.scales, packed.qzeros, 32, in_features).double()
        qweight, scales, _ = to_x16_layout(packed.qweight, packed.scales, packed.qzeros)

        def run(x):
            return vnni_ops.int4_x16_linear(x, qweight, scales, None, 32, None, 2**62)
    else:
        packed = quantize_int8(torch.randn(out_features, in_features))
        weight = (packed.qweight.double() * packed.scales.double().unsqueeze(1))
        tiled = int8_to_x16(packed.qweight)

        def run(x):
            return vnni_ops.int8_x16_linear(x, tiled, packed.scales, None, 2**62)

    x = torch.randn(3, in_features)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = run(x)
        torch.set_num_threads(2)
        shared = [run(x) for _ in range(20)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(y, alone) for y in shared)
    expected = round_activations_int8(x).double() @ weight.t()
    torch.testing.assert_close(alone.double(), expected, atol=1e-4, rtol=1e-5)


def test_stream_order_gives_each_thread_one_contiguous_range(cpu_ops):
    for num_chunks in range(1, 40):
        for parts in range(1, 6):
            chunks = [cpu_ops.contiguous_chunk(k, num_chunks, parts) for k in range(num_chunks)]
            assert sorted(chunks) == list(range(num_chunks)), (num_chunks, parts)  # each chunk exactly once
            for r in range(parts):  # while the threads take turns, thread r's chunks are consecutive
                own = chunks[r::parts]
                assert own == list(range(own[0], own[0] + len(own))) if own else True
    for bad in ((0, 4, 0), (4, 4, 2), (-1, 4, 2)):  # no parts, claims outside the job: a clear error
        with pytest.raises(RuntimeError):
            cpu_ops.contiguous_chunk(*bad)


def test_tied_int8_head_on_the_vnni_kernel_keeps_lookups_right(vnni_ops, tiny_tied):
    """A tied INT8 head is repacked for the VNNI kernel; the embedding shares the tensor and must still
    find each token's row."""
    from frugal.model.arch_config import load_arch_config
    from frugal.model.loader import load_model
    from frugal.quant.config import QuantConfig
    from frugal.runner.kv_cache import allocate_kv_caches
    from model.helpers import run_schedule

    arch = load_arch_config(tiny_tied)
    quant = QuantConfig.create("int4", group_size=64)
    logits = {}
    for backend in ("cpu", "reference"):
        model = load_model(tiny_tied, arch, torch.float32, "cpu", progress=False, quantization=quant,
                           kernel_backend=backend, quant_activations="int8")
        kv_caches = allocate_kv_caches(arch, 4, 16, torch.float32, "cpu")
        tokens = [1, 17, 99, 250, 3, 77, 411, 8, 8, 120, 64, 301]
        logits[backend] = run_schedule(model, kv_caches, [tokens], [[0, 1, 2, 3]], [[8, 1, 1, 1, 1]], 16)[0]
        if backend == "cpu":
            assert model.lm_head.qweight is model.model.embed_tokens.qweight
            assert model.lm_head.int8_x16 and model.lm_head.qweight.x16_layout
            ids = torch.tensor([0, 5, 17, arch.vocab_size - 1])
            from frugal.quant.int8 import from_x16_layout

            canonical = from_x16_layout(model.lm_head.qweight)
            expected = canonical[ids].float() * model.lm_head.scales[ids, None]
            torch.testing.assert_close(model.model.embed_tokens(ids).float(), expected)
    torch.testing.assert_close(logits["cpu"], logits["reference"], atol=1e-4, rtol=1e-4)


def test_fallback_backend_keeps_activations_exact():
    """Without our kernels (the automatic 'reference' fallback) rounding would only cost time: exact."""
    from frugal.quant.base import build_quant_methods
    from frugal.quant.config import QuantConfig

    for quant in ("int4", "int8"):
        config = QuantConfig.create(quant)
        auto = build_quant_methods(config, torch.float32, "meta", False, quant_activations="int8")
        assert not auto.linear.int8_activations and not auto.lm_head.int8_activations
        oracle = build_quant_methods(config, torch.float32, "meta", False, backend="reference",
                                     quant_activations="int8")
        assert oracle.linear.int8_activations  # forced 'reference' stays the VNNI path's oracle


def test_chunked_repack_equals_whole_tensor_repack():
    from frugal.quant.base import repack_in_row_chunks
    from frugal.quant.int4 import to_kernel_layout
    from frugal.quant.int8 import to_x16_layout as int8_to_x16

    for repack, rows in ((to_x16_layout, 80), (to_kernel_layout, 83)):  # 83: a 4-row layout with a tail
        qweight = pack_nibbles(torch.randint(0, 16, (rows, 128), dtype=torch.uint8))
        scales = torch.randn(rows, 4).half()
        zeros = torch.randint(0, 16, (rows, 4), dtype=torch.uint8)
        whole = repack(qweight, scales, zeros)
        tensors = [qweight.clone(), scales.clone(), zeros.clone()]
        repack_in_row_chunks(tensors, repack, rows_per_chunk=32)
        assert all(torch.equal(a, b) for a, b in zip(tensors, whole))
    table = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    chunked = table.clone()
    repack_in_row_chunks([chunked], lambda chunk: [int8_to_x16(chunk)], rows_per_chunk=16)
    assert torch.equal(chunked, int8_to_x16(table))


def test_vnni_kernels_reject_activations_wider_than_the_weight(vnni_ops):
    packed = quantize_int4(torch.randn(16, 64), 32, "sym")
    qweight, scales, _ = to_x16_layout(packed.qweight, packed.scales, None)
    with pytest.raises(RuntimeError, match="at most 64"):
        vnni_ops.int4_x16_linear(torch.randn(1, 65), qweight, scales, None, 32, None, 16)
