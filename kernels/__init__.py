"""kvrelay.kernels: KV block gather/scatter and page layout conversion.

Triton kernels on CUDA, a torch reference everywhere else (``ops`` checks inputs and picks).
Imports nothing else of kvrelay. See ``layouts.py`` for what a page holds in each format.

This folder must only ever be imported as ``kvrelay.kernels``: a bare ``kernels`` is the name
of Hugging Face's kernel hub package, which transformers probes for with ``find_spec("kernels")``
and then ``import_module("kernels")`` whenever the repository root is on ``sys.path`` (``python
-m`` or ``-c`` run from the root). Raising at import would crash that probe (transformers does
not catch it) and so break model loading; instead, under the bare name this module imports
nothing, looks like a package without a version (which transformers reads as "not available"),
and raises ImportError, saying why, the moment anything is taken from it.
"""

__all__ = [
    "CPU_NHBC",
    "GPU_HND",
    "GPU_NHD",
    "KernelError",
    "KernelInputError",
    "PageSpec",
    "UnsupportedLayoutError",
    "backend_for",
    "convert_block_size",
    "convert_layout",
    "cpu_format_for_isa",
    "cpu_to_gpu_layout",
    "gather_blocks",
    "gpu_to_cpu_layout",
    "merge_heads_from_tp",
    "scatter_blocks",
    "split_heads_for_tp",
    "triton_available",
]

if __name__ == "kernels":
    __path__: list[str] = []  # no submodules under the bare name either; `from kernels import *`
    # fails loudly too, since every name in __all__ goes through __getattr__ below

    def __getattr__(name: str) -> object:
        if name.startswith("__"):  # getattr(module, "__version__", default) probes must still work
            raise AttributeError(name)
        raise ImportError(
            f"cannot take {name!r} from a bare `kernels`: this folder is kvrelay's kernel package and must "
            "be imported as `kvrelay.kernels` (`kernels` is Hugging Face's kernel hub package, which "
            "transformers probes for); install kvrelay (pip install -e .) and import kvrelay.kernels"
        )

else:
    from kvrelay.kernels.errors import KernelError, KernelInputError, UnsupportedLayoutError
    from kvrelay.kernels.layouts import CPU_NHBC, GPU_HND, GPU_NHD, PageSpec, cpu_format_for_isa
    from kvrelay.kernels.ops import (
        backend_for,
        convert_block_size,
        convert_layout,
        cpu_to_gpu_layout,
        gather_blocks,
        gpu_to_cpu_layout,
        merge_heads_from_tp,
        scatter_blocks,
        split_heads_for_tp,
        triton_available,
    )
