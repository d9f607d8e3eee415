"""frugal's fused CPU ops against the eager PyTorch code they replace (RMSNorm, rotary, SiLU-and-mul) and
against the reference attention backend (paged decode attention)."""

from __future__ import annotations

import pytest
import torch

from frugal.layers.activation import SiluAndMul
from frugal.layers.attention_backends import ReferenceAttentionBackend, get_attention_backend
from frugal.layers.attention_metadata import AttentionMetadata
from frugal.layers.norm import RMSNorm
from frugal.layers.rotary import RotaryEmbedding

EXACT = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture(autouse=True)
def _ops(cpu_ops):
    return cpu_ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [96, 100])  # 100: a tail after the 16-wide vectors
def test_rms_norm_fused_matches_eager(dtype, hidden):
    norm = RMSNorm(hidden, eps=1e-5)
    assert norm._forward_method == norm._forward_fused
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden))
    norm = norm.to(dtype)
    x, residual = torch.randn(7, hidden).to(dtype), torch.randn(7, hidden).to(dtype)
    torch.testing.assert_close(norm(x), norm._forward_native(x, None), **EXACT[dtype])
    fused_out, fused_sum = norm(x, residual)
    native_out, native_sum = norm._forward_native(x, residual)
    assert torch.equal(fused_sum, native_sum)  # the residual add rounds exactly as eager does
    torch.testing.assert_close(fused_out, native_out, **EXACT[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64])  # 64: the 16-wide vector path (half a head per vector pair)
def test_rotary_fused_matches_eager_and_leaves_inputs_alone(dtype, head_dim):
    rope = RotaryEmbedding(head_dim, 64, 10000.0)
    assert rope._forward_method == rope._forward_fused
    qkv = torch.randn(5, 4 * head_dim + 2 * 2 * head_dim).to(dtype)
    q, k, _ = qkv.split([4 * head_dim, 2 * head_dim, 2 * head_dim], dim=-1)  # strided views, as the model passes
    q, k = q.reshape(5, 4, head_dim), k.reshape(5, 2, head_dim)
    before = qkv.clone()
    positions = torch.tensor([0, 3, 63, 7, 7])
    fused_q, fused_k = rope(positions, q, k)
    native_q, native_k = rope._forward_native(positions, q, k)
    assert torch.equal(qkv, before)
    torch.testing.assert_close(fused_q, native_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused_k, native_k, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_fused_matches_eager(dtype):
    act = SiluAndMul()
    x = (torch.randn(3, 2 * 300) * 4).to(dtype)  # 300: not a multiple of the 16-wide vectors
    torch.testing.assert_close(act(x), SiluAndMul._forward_native(x), **EXACT[dtype])


def _paged_decode_case(dtype, seq_lens, num_heads=8, num_kv_heads=2, head_dim=32, block_size=4):
    torch.manual_seed(len(seq_lens))
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    perm = torch.randperm(num_blocks).tolist()  # scattered blocks
    tables, start = [], 0
    for n in seq_lens:
        count = -(-n // block_size)
        tables.append(perm[start:start + count])
        start += count
    block_tables = torch.zeros(len(seq_lens), max(len(t) for t in tables), dtype=torch.int64)
    for i, table in enumerate(tables):
        block_tables[i, :len(table)] = torch.tensor(table)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor([tables[i][(n - 1) // block_size] * block_size + (n - 1) % block_size
                                   for i, n in enumerate(seq_lens)]),
        block_tables=block_tables, query_start_loc=list(range(len(seq_lens) + 1)), query_lens=[1] * len(seq_lens),
        seq_lens=list(seq_lens), block_size=block_size)
    query = torch.randn(len(seq_lens), num_heads, head_dim).to(dtype)
    return query, kv_cache, metadata


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("head_dim,seq_lens", [(32, [1, 9, 17, 4]), (64, [40, 3]), (128, [1100, 33])])
def test_paged_decode_attention_matches_reference(dtype, sliding_window, head_dim, seq_lens):
    backend = get_attention_backend("auto", "cpu")
    assert backend.name == "cpu"
    query, kv_cache, metadata = _paged_decode_case(dtype, seq_lens, head_dim=head_dim)
    ours = backend.forward(query, kv_cache, metadata, 0.125, sliding_window)
    reference = ReferenceAttentionBackend().forward(query, kv_cache, metadata, 0.125, sliding_window)
    torch.testing.assert_close(ours, reference, **EXACT[dtype])


def test_paged_decode_attention_odd_head_dim_uses_the_scalar_path():
    query, kv_cache, metadata = _paged_decode_case(torch.float32, [3, 6], head_dim=12)
    ours = get_attention_backend("cpu").forward(query, kv_cache, metadata, 0.3, None)
    reference = ReferenceAttentionBackend().forward(query, kv_cache, metadata, 0.3, None)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_does_not_depend_on_batch_or_threads(dtype):
    """Work is split by position chunks fixed by each request's own length: a request's output is the
    same bits alone or in a batch, on one thread or two (so greedy decoding cannot change with either)."""
    query, kv_cache, metadata = _paged_decode_case(dtype, [700, 5, 300], num_heads=9, num_kv_heads=3, head_dim=64)
    backend = get_attention_backend("cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batched = backend.forward(query, kv_cache, metadata, 0.125, None)
        torch.set_num_threads(1)
        one_thread = backend.forward(query, kv_cache, metadata, 0.125, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched, one_thread)
    for i, seq_len in enumerate(metadata.seq_lens):
        alone = AttentionMetadata(slot_mapping=metadata.slot_mapping[i:i + 1],
                                  block_tables=metadata.block_tables[i:i + 1], query_start_loc=[0, 1], query_lens=[1],
                                  seq_lens=[seq_len], block_size=metadata.block_size)
        assert torch.equal(backend.forward(query[i:i + 1], kv_cache, alone, 0.125, None), batched[i:i + 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_vector_lanes_equal_the_scalar_tail(dtype):
    """Values repeating every 16: the scalar tail (the last 300 % 16 = 12) gives the vector lanes' bits."""
    pattern = torch.randn(2, 16) * 4
    gate, up = pattern[0].repeat(19)[:300], pattern[1].repeat(19)[:300]
    out = torch.ops.frugal.silu_and_mul(torch.cat([gate, up]).to(dtype).unsqueeze(0))[0]
    assert torch.equal(out[288:], out[:12])


def test_paged_decode_attention_rejects_a_length_beyond_the_block_table():
    query, kv_cache, metadata = _paged_decode_case(torch.float32, [9, 4], head_dim=32)
    seq_lens = torch.tensor([9, metadata.block_tables.shape[1] * metadata.block_size + 1])
    with pytest.raises(RuntimeError, match="does not fit the request's block table"):
        torch.ops.frugal.paged_attention_decode(query, kv_cache, metadata.block_tables, seq_lens, 0.125, 0)


def _amx_switch():
    from frugal.quant.kernels import cpu_kernels

    kernels = cpu_kernels()
    if kernels is None or not kernels.amx_attention_available():
        pytest.skip("no AMX-BF16 here (or Linux refused the tile state)")
    return kernels


def _attention_with_and_without_amx(kernels, query, kv_cache, metadata, sliding_window):
    backend = get_attention_backend("cpu")
    enabled = kernels.amx_attention_enabled()
    try:
        kernels.set_amx_attention(True)
        assert kernels.amx_attention_enabled()
        with_amx = backend.forward(query, kv_cache, metadata, 0.125, sliding_window)
        kernels.set_amx_attention(False)
        assert not kernels.amx_attention_enabled()
        without = backend.forward(query, kv_cache, metadata, 0.125, sliding_window)
    finally:
        kernels.set_amx_attention(enabled)
    return with_amx, without


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,seq_lens,sliding_window", [
    (8, 2, 64, 16, [700, 5, 33], None),  # 16 positions in one block: K tiles loaded in place
    (16, 4, 64, 4, [300, 17], None),  # blocks of 4: rows gathered
    (16, 1, 128, 16, [129, 64], 7),  # 16 heads per KV head, two passes over head dims, a window
    (8, 1, 32, 8, [50, 1], None),  # head_dim 32
])
def test_amx_decode_attention_matches_the_reference_and_the_avx512_path(num_heads, num_kv_heads, head_dim,
                                                                        block_size, seq_lens, sliding_window):
    kernels = _amx_switch()
    query, kv_cache, metadata = _paged_decode_case(torch.bfloat16, seq_lens, num_heads=num_heads,
                                                   num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size)
    with_amx, without = _attention_with_and_without_amx(kernels, query, kv_cache, metadata, sliding_window)
    reference = ReferenceAttentionBackend().forward(query, kv_cache, metadata, 0.125, sliding_window)
    torch.testing.assert_close(with_amx, reference, **EXACT[torch.bfloat16])
    torch.testing.assert_close(with_amx, without, **EXACT[torch.bfloat16])
    assert not torch.equal(with_amx, without)  # the tiles really ran (their P V takes bf16 weights)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 1), (9, 3)])
def test_amx_decode_attention_leaves_other_shapes_to_avx512(num_heads, num_kv_heads):
    """32 query heads per KV head do not fit a 16-column tile, and below 4 the tiles do not pay: both settings
    take the same AVX-512 path."""
    kernels = _amx_switch()
    query, kv_cache, metadata = _paged_decode_case(torch.bfloat16, [100, 7], num_heads=num_heads,
                                                   num_kv_heads=num_kv_heads, head_dim=64, block_size=16)
    with_amx, without = _attention_with_and_without_amx(kernels, query, kv_cache, metadata, None)
    assert torch.equal(with_amx, without)
