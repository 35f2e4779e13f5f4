"""kvrelay.kernels: KV block gather/scatter between per-layer caches and a contiguous buffer.

Triton kernels on CUDA, a torch reference everywhere else (``ops`` checks inputs and picks).
Imports nothing else of kvrelay. Pages are moved whole, as opaque bytes: what is inside a page
(its format, block size, head split) never matters here.

This folder must only ever be imported as ``kvrelay.kernels``: a bare ``kernels`` is the name
of Hugging Face's kernel hub package, which transformers probes for with ``find_spec("kernels")``
and then ``import_module("kernels")`` whenever the repository root is on ``sys.path`` (``python
-m`` or ``-c`` run from the root). Raising at import would crash that probe (transformers does
not catch it) and so break model loading; instead, under the bare name this module imports
nothing, looks like a package without a version (which transformers reads as "not available"),
and raises ImportError, saying why, the moment anything is taken from it.
"""

__all__ = [
    "KernelError",
    "KernelInputError",
    "backend_for",
    "gather_blocks",
    "scatter_blocks",
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
    from kvrelay.kernels.errors import KernelError, KernelInputError
    from kvrelay.kernels.ops import backend_for, gather_blocks, scatter_blocks, triton_available
