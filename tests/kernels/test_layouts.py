"""Page formats: PageSpec, and the formats checked against what vLLM 0.32 really does."""

from __future__ import annotations

import pytest
import torch

from kvrelay import kernels
from kvrelay.kernels import KernelInputError, PageSpec, UnsupportedLayoutError, cpu_format_for_isa


@pytest.mark.parametrize(
    "fmt,page,heads,bs,dim",
    [
        ("gpu_nhd", (32, 3, 128), 3, 32, 64),
        ("gpu_hnd", (3, 32, 128), 3, 32, 64),
        ("cpu_nhbc", (8, 16, 256), 8, 16, 128),
    ],
)
def test_pagespec_reads_heads_block_size_and_head_dim_off_the_page_shape(fmt, page, heads, bs, dim):
    spec = PageSpec.from_page_shape(fmt, page)
    assert (spec.num_kv_heads, spec.block_size, spec.head_dim) == (heads, bs, dim)
    assert spec.shape == page and spec.numel == heads * bs * 2 * dim


@pytest.mark.parametrize("fmt", ["gpu_nhd", "gpu_hnd", "cpu_nhbc"])
def test_pagespec_kv_strides_cover_every_page_element_once(fmt):
    spec = PageSpec(fmt, 3, 8, 4)
    seen = []
    for base, tok, head, dim in spec.kv_strides():
        seen += [base + t * tok + h * head + d * dim for t in range(8) for h in range(3) for d in range(4)]
    assert sorted(seen) == list(range(spec.numel))


def test_pagespec_rejects_bad_fields():
    with pytest.raises(UnsupportedLayoutError, match="unknown page format"):
        PageSpec("nhd", 1, 1, 1)
    with pytest.raises(KernelInputError, match="block_size: must be a positive int"):
        PageSpec("gpu_nhd", 1, 0, 1)
    with pytest.raises(KernelInputError, match="even last dim"):
        PageSpec.from_page_shape("gpu_nhd", (32, 3, 7))


def test_cpu_format_for_isa_accepts_plain_isas_and_refuses_packed_ones():
    assert cpu_format_for_isa("vec") == cpu_format_for_isa("vec16") == "cpu_nhbc"
    for isa in ("amx", "neon", "vsx", "vxe", "rvv", "nope"):
        with pytest.raises(UnsupportedLayoutError) as err:
            cpu_format_for_isa(isa)
        assert err.value.arg == "isa" and repr(isa) in str(err.value)


# --- against vLLM 0.32 itself ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("block_size,head_dim", [(32, 64), (64, 32), (32, 80), (16, 64)])
def test_cpu_nhbc_matches_what_vllm_cpu_attention_writes(dtype, block_size, head_dim):
    """Write K/V with vLLM's own cpu_attn_reshape_and_cache, then read them back through kvrelay."""
    pytest.importorskip("vllm", reason="vllm is not installed")
    from vllm import _custom_ops as vllm_ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_dim)
    heads, num_blocks, first_block, tokens = 3, 6, 2, 2 * block_size + 5
    g = torch.Generator().manual_seed(block_size + head_dim)
    key = torch.randn(tokens, heads, head_dim, generator=g).to(dtype)
    value = torch.randn(tokens, heads, head_dim, generator=g).to(dtype)
    cache = torch.zeros(
        num_blocks, heads, block_size, 2 * head_dim, dtype=dtype
    )  # one layer, as vLLM allocates
    key_cache, value_cache = cache.view(num_blocks, heads, 2 * block_size, head_dim).chunk(
        2, dim=2
    )  # as forward()
    slots = torch.arange(tokens) + first_block * block_size
    vllm_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)

    blocks = kernels.gather_blocks([cache], torch.arange(first_block, first_block + 3))  # [3, 1, H, bs, 2D]
    if isa not in ("vec", "vec16"):
        with pytest.raises(UnsupportedLayoutError):
            kernels.cpu_to_gpu_layout(blocks, isa=isa)
        return
    nhd = kernels.cpu_to_gpu_layout(blocks, isa=isa, gpu_fmt="gpu_nhd")  # [3, 1, bs, H, 2D]
    per_token = nhd[:, 0].reshape(3 * block_size, heads, 2 * head_dim)[:tokens]
    assert torch.equal(per_token[..., :head_dim], key)
    assert torch.equal(per_token[..., head_dim:], value)


def test_gpu_formats_match_vllm_kv_cache_layouts():
    """gpu_nhd / gpu_hnd are vLLM 0.32's LBNHC / LBHNC per-layer pages in physical order."""
    pytest.importorskip("vllm", reason="vllm is not installed")
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.utils import _DEFAULT_LAYOUT_PREFERENCE
    from vllm.v1.kv_cache_layout import KVCacheLayout

    logical = ("H", "N", "C")  # logical page axes of the [B, H, N, C] per-layer view
    physical = {
        layout: tuple(logical[i - 1] for i in layout.layer_view_order[1:]) for layout in KVCacheLayout
    }
    assert physical[KVCacheLayout.LBNHC] == ("N", "H", "C")  # gpu_nhd page [bs, H, 2D]
    assert physical[KVCacheLayout.LBHNC] == ("H", "N", "C")  # gpu_hnd and cpu_nhbc pages [H, bs, 2D]
    assert _DEFAULT_LAYOUT_PREFERENCE[0] is KVCacheLayout.LBNHC  # what FlashAttention (no preference) gets
    assert CPUAttentionBackend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
