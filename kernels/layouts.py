"""Page layouts: where one token's K and V of one head sit inside one (block, layer) page.

A *page* is one vLLM block of one layer: ``num_kv_heads * block_size * 2 * head_dim`` elements,
contiguous. kvrelay moves pages as opaque bytes (gather/scatter); it needs to know what is inside
a page only to re-chunk tokens (block-size conversion), split heads (tensor parallelism), or
convert between engines. Three formats, all read from vLLM 0.32's source:

``cpu_nhbc`` -- vLLM's CPU backend. The per-layer cache is ``(num_blocks, num_kv_heads, block_size,
    2 * head_dim)`` (``vllm/v1/attention/backends/cpu_attn.py``, ``CPUAttentionBackend`` supports
    only ``KVCacheLayout.LBHNC``). That shape is *not* "K then V per token": ``forward`` views it as
    ``(num_blocks, num_kv_heads, 2 * block_size, head_dim)`` and ``chunk(2, dim=2)``, so each head's
    page holds a K region then a V region of ``block_size * head_dim`` elements each. The C++ op
    ``cpu_attn_reshape_and_cache`` then writes K *column-major* -- ``[head_dim, block_size]`` -- and
    V row-major -- ``[block_size, head_dim]`` -- for the ``vec`` and ``vec16`` ISAs
    (``csrc/cpu/cpu_attn_vec.hpp``: "reshape K as column-major and V as row-major"; checked against
    the installed op by ``tests/kernels/test_vllm_layouts.py``). Page memory per head:
    ``K[d, t]`` at ``d * block_size + t``, ``V[t, d]`` at ``block_size * head_dim + t * head_dim + d``.
    The ``amx`` ISA (bf16 on CPUs with AMX tiles) packs K in 16-token groups of bf16 pairs and V in
    token pairs (VNNI), and ``neon``/``vsx``/``vxe``/``rvv`` have their own kernels: those are refused
    (``cpu_format_for_isa``) rather than converted wrongly.

``gpu_nhd`` -- vLLM 0.32 on CUDA with FlashAttention (and any backend left at the default
    ``KVCacheLayout.LBNHC``, "NHD", first in ``_DEFAULT_LAYOUT_PREFERENCE`` of
    ``vllm/v1/attention/backends/utils.py``). The logical per-layer view is ``(num_blocks,
    num_kv_heads, block_size, 2 * head_dim)`` with physical order ``(block, token, head, channel)``;
    ``flash_attn.py`` reads it as ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``: channel
    ``[:head_dim]`` is K, ``[head_dim:]`` is V. Page shape ``[block_size, num_kv_heads, 2 * head_dim]``.
    Note: older vLLM (<= 0.11) used ``(2, num_blocks, block_size, num_kv_heads, head_dim)`` for
    FlashAttention, where a block's K and V are not one contiguous page; 0.32 no longer does.

``gpu_hnd`` -- ``KVCacheLayout.LBHNC`` on CUDA ("HND", FlashInfer's TRT-LLM kernels): page shape
    ``[num_kv_heads, block_size, 2 * head_dim]``, channel ``[:head_dim]`` is K, ``[head_dim:]`` V.

Every format is affine inside a page for K and for V separately: element ``(t, h, d)`` of K sits at
``k_base + t * k_tok + h * k_head + d * k_dim``. The Triton kernels take those strides as arguments,
so one kernel handles every format pair.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvrelay.kernels.errors import KernelInputError, UnsupportedLayoutError

CPU_NHBC = "cpu_nhbc"
GPU_NHD = "gpu_nhd"
GPU_HND = "gpu_hnd"
FORMATS = (CPU_NHBC, GPU_NHD, GPU_HND)

# vLLM CPU attention ISAs (``_get_attn_isa`` in cpu_attn.py) whose K/V order is the plain
# column-major-K / row-major-V one described above.
PLAIN_CPU_ISAS = frozenset({"vec", "vec16"})
_PACKED_CPU_ISAS = {
    "amx": "AMX packs K into 16-token groups of bf16 pairs and V into token pairs (VNNI tiles)",
    "neon": "the NEON kernel (cpu_attn_neon.hpp) keeps its own block-interior order",
    "vsx": "the VSX kernel (cpu_attn_vsx.hpp) keeps its own block-interior order",
    "vxe": "the VXE kernel (cpu_attn_vxe.hpp) keeps its own block-interior order",
    "rvv": "the RVV kernel (cpu_attn_rvv.hpp) keeps its own block-interior order",
}

# (base, token, head, dim) element strides of K, then V, inside one page.
KVStrides = tuple[tuple[int, int, int, int], tuple[int, int, int, int]]


def cpu_format_for_isa(isa: str) -> str:
    """The page format of vLLM's CPU cache written by attention ISA ``isa`` ("vec", "amx", ...).

    Raises ``UnsupportedLayoutError`` for ISAs whose in-page order is packed for their matrix
    units: converting those needs their exact tile order, which this machine cannot verify.
    Whole-page moves (gather/scatter between two workers of the same ISA) are fine for any ISA.
    """
    if isa in PLAIN_CPU_ISAS:
        return CPU_NHBC
    why = _PACKED_CPU_ISAS.get(isa, "it is not an ISA of vLLM 0.32's CPU attention backend")
    raise UnsupportedLayoutError(
        "isa",
        f"cannot convert vLLM CPU pages written by ISA {isa!r}: {why}; only {sorted(PLAIN_CPU_ISAS)} "
        "store K as [head_dim, block_size] and V as [block_size, head_dim]. Copy whole pages "
        "between workers of the same ISA instead, or run the CPU worker with a plain-ISA dtype",
    )


@dataclass(frozen=True)
class PageSpec:
    """The shape and format of one (block, layer) page."""

    fmt: str
    num_kv_heads: int
    block_size: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise UnsupportedLayoutError("fmt", f"unknown page format {self.fmt!r}; known: {list(FORMATS)}")
        for name in ("num_kv_heads", "block_size", "head_dim"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise KernelInputError(name, f"must be a positive int, got {value!r}")

    @classmethod
    def from_page_shape(cls, fmt: str, page_shape: tuple[int, ...], arg: str = "blocks") -> PageSpec:
        """Read heads, block size and head_dim off a page shape in format ``fmt``."""
        if fmt not in FORMATS:
            raise UnsupportedLayoutError("fmt", f"unknown page format {fmt!r}; known: {list(FORMATS)}")
        if len(page_shape) != 3 or page_shape[2] % 2 != 0 or min(page_shape) < 1:
            want = (
                "[block_size, num_kv_heads, 2*head_dim]"
                if fmt == GPU_NHD
                else ("[num_kv_heads, block_size, 2*head_dim]")
            )
            raise KernelInputError(
                arg, f"a {fmt} page must be {want} with an even last dim, got {list(page_shape)}"
            )
        if fmt == GPU_NHD:
            block_size, heads, channels = page_shape
        else:
            heads, block_size, channels = page_shape
        return cls(fmt, heads, block_size, channels // 2)

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.fmt == GPU_NHD:
            return (self.block_size, self.num_kv_heads, 2 * self.head_dim)
        return (self.num_kv_heads, self.block_size, 2 * self.head_dim)

    @property
    def numel(self) -> int:
        return self.num_kv_heads * self.block_size * 2 * self.head_dim

    def with_(self, **changes: object) -> PageSpec:
        return replace(self, **changes)

    def kv_strides(self) -> KVStrides:
        """Element offsets inside a page: ((k_base, k_tok, k_head, k_dim), (v_base, v_tok, v_head, v_dim))."""
        heads, bs, dim = self.num_kv_heads, self.block_size, self.head_dim
        if self.fmt == GPU_NHD:  # page [bs, H, 2D]
            k = (0, heads * 2 * dim, 2 * dim, 1)
            return k, (dim, *k[1:])
        if self.fmt == GPU_HND:  # page [H, bs, 2D]
            k = (0, 2 * dim, bs * 2 * dim, 1)
            return k, (dim, *k[1:])
        # cpu_nhbc, per head: K [D, bs] then V [bs, D]
        return (0, 1, 2 * bs * dim, bs), (bs * dim, dim, 2 * bs * dim, 1)
