"""Only the C extensions live here; everything else is in pyproject.toml.

Both are optional at build time: without a C compiler kvrelay installs and runs on the pure-Python
implementations they replace (``kvrelay.schemas.hashing``, ``kvrelay.router.index_store``), which
are also the references their tests compare against. ``deploy/bootstrap.sh`` says whether they were
built; a running router logs ``kv_index impl=...`` and exports ``kvrelay_router_kv_index_native``.
"""

from setuptools import Extension, setup

_FLAGS = ["-O3", "-std=c11", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
_HOLDERS = ["router/native/holders_table.c", "router/native/holders_match.c", "router/native/holders_module.c"]

setup(
    ext_modules=[
        Extension("kvrelay.schemas._chainhash", ["schemas/native/chainhash.c"], extra_compile_args=_FLAGS,
                  optional=True),
        Extension("kvrelay.router._holders", _HOLDERS, depends=["router/native/holders.h"],
                  extra_compile_args=_FLAGS, optional=True),
    ],
)
