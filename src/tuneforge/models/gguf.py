"""GGUF files as model references: a ``.gguf`` file is a model everywhere a model path is accepted.

A GGUF file (llama.cpp's single-file format) is loaded through transformers' own GGUF support (``gguf_file=``,
the ``gguf`` package), dequantized, with the tokenizer and chat template stored in the file. Dequantizing takes a
while (~70 s for a 135M-parameter Q4_1 file on a loaded 2-core machine), so the result is converted once into a
plain Hugging Face model directory in the cache, keyed by the file's SHA-256::

    ${TUNEFORGE_CACHE:-~/.cache/tuneforge}/gguf/<sha256>/   config.json, model.safetensors (fp32), tokenizer,
                                                             chat_template.jinja, gguf_source.json

and every later load reads that directory (seconds). The directory is an implementation detail: runs, adapters
and reports name the ``.gguf`` file itself (and its SHA-256), so an adapter trained on a GGUF loads back onto it.

Why a plain model is rebuilt: transformers marks a GGUF-loaded model as quantized (``quantization_config`` with
``quant_method: gguf``) and ``save_pretrained`` refuses it; the weights are already dense, so a model built from
the same config without ``quantization_config`` takes its state dict unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError

log = logging.getLogger(__name__)

#: llama.cpp architectures (``general.architecture``) tuneforge loads from GGUF and exports to GGUF; each has a
#: tested tensor layout (llama: q/k rows permuted by llama.cpp's converter, reversed by transformers' reader).
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
#: tensor storage types the ``gguf`` package dequantizes in numpy (what a GGUF model reference may contain)
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
#: tokenizer models (``tokenizer.ggml.model``) supported: byte-level BPE (GPT-2 style, used by Llama 3, Qwen2, SmolLM)
SUPPORTED_TOKENIZERS = ("gpt2",)
SOURCE_FILE = "gguf_source.json"  # written into each converted directory: which file it came from
CONVERTER_VERSION = 1              # bump to invalidate converted directories made by an older conversion


def cache_root() -> Path:
    """``$TUNEFORGE_CACHE`` (default ``~/.cache/tuneforge``)."""
    return Path(os.environ.get("TUNEFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tuneforge"))


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` is an existing file named ``*.gguf``."""
    path = Path(str(path)).expanduser()
    return path.suffix.lower() == ".gguf" and path.is_file()


def gguf_in_dir(path: str | Path) -> Path | None:
    """The one ``*.gguf`` file of a directory that holds no ``config.json`` (a downloaded GGUF folder), else None.

    Raises:
        UserError: the directory holds several ``.gguf`` files (say which one with ``model.gguf_file``).
    """
    path = Path(str(path)).expanduser()
    if not path.is_dir() or (path / "config.json").exists() or (path / "adapter_config.json").exists():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise UserError(f"{path} holds several GGUF files ({names}): name one, e.g. model.name_or_path: "
                        f"{files[0]} (or model.gguf_file: {files[0].name})")
    return files[0] if files else None


def gguf_path_of(name: str | Path) -> Path | None:
    """The GGUF file ``name`` refers to (a ``.gguf`` file, or a folder holding exactly one), absolute; else None."""
    if is_gguf_file(name):
        return Path(str(name)).expanduser().resolve()
    found = gguf_in_dir(name)
    return found.resolve() if found is not None else None


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, memoised by (path, size, mtime) in ``<cache>/gguf/hashes.json``."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_file = cache_root() / "gguf" / "hashes.json"
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo, dict) and isinstance(memo.get(key), str):
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    try:
        from tuneforge.utils import atomic_write_json

        memo = memo if isinstance(memo, dict) else {}
        memo[key] = value
        atomic_write_json(memo_file, memo)
    except OSError:  # a read-only cache only costs a re-hash next time
        pass
    return value


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file holds, read from its header (no tensor data).

    Attributes:
        path: the file.
        architecture: ``general.architecture`` (``llama``, ``qwen2``, ...).
        name: ``general.name`` when present.
        tensor_types: storage type name -> number of tensors (``{"Q4_1": 210, "F32": 61, ...}``).
        tokenizer_model: ``tokenizer.ggml.model`` (``gpt2`` = byte-level BPE).
        tokenizer_pre: ``tokenizer.ggml.pre`` (the BPE pre-tokenizer name), or None.
        chat_template: ``tokenizer.chat_template``, or None.
        metadata: every scalar metadata key (arrays are given as their length).
    """

    path: Path
    architecture: str
    name: str | None
    tensor_types: dict[str, int]
    tokenizer_model: str | None
    tokenizer_pre: str | None
    chat_template: str | None
    metadata: dict[str, Any]


def read_info(path: str | Path) -> GGUFInfo:
    """Read a GGUF file's header: architecture, tensor storage types, tokenizer kind and chat template.

    Raises:
        UserError: not a GGUF file, or an unreadable one.
    """
    from gguf import GGMLQuantizationType
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    path = Path(path)
    try:
        metadata, _ = read_gguf_metadata(str(path))
        header = GgufHeader.from_file(str(path))
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"{path}: not a readable GGUF file ({exc})") from None
    types: dict[str, int] = {}
    for info in header.tensors:
        try:
            name = GGMLQuantizationType(info.ggml_type).name
        except ValueError:
            name = f"type {info.ggml_type}"
        types[name] = types.get(name, 0) + 1

    def text(key: str) -> str | None:
        value = metadata.get(key)
        return value if isinstance(value, str) else None

    return GGUFInfo(path, str(metadata.get("general.architecture")), text("general.name"), types,
                    text("tokenizer.ggml.model"), text("tokenizer.ggml.pre"), text("tokenizer.chat_template"),
                    {k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool))})


def check_supported(info: GGUFInfo) -> None:
    """Refuse a GGUF file tuneforge cannot load faithfully, naming what is supported.

    Raises:
        UserError: an unsupported architecture, tensor storage type or tokenizer model.
    """
    if info.architecture not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{info.path}: GGUF architecture {info.architecture!r} is not supported; supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)} (convert the original Hugging Face checkpoint "
                        "instead and give its directory)")
    bad = sorted(t for t in info.tensor_types if t not in SUPPORTED_TENSOR_TYPES)
    if bad:
        raise UserError(f"{info.path}: tensor type(s) {', '.join(bad)} cannot be dequantized here; supported: "
                        f"{', '.join(SUPPORTED_TENSOR_TYPES)}")
    if info.tokenizer_model not in SUPPORTED_TOKENIZERS:
        raise UserError(f"{info.path}: tokenizer model {info.tokenizer_model!r} (tokenizer.ggml.model) is not "
                        f"supported; supported: {', '.join(SUPPORTED_TOKENIZERS)} (byte-level BPE)")


def converted_dir(path: str | Path) -> Path:
    """Where the converted HF directory of a GGUF file lives (it may not exist yet)."""
    return cache_root() / "gguf" / f"{file_sha256(path)}-v{CONVERTER_VERSION}"


def source_record(path: str | Path) -> dict:
    """``{"gguf_file", "sha256", "architecture", "tensor_types", "tokenizer_pre", "name"}`` for a GGUF file:
    what a run records about a GGUF base (``summary.json`` / the run manifest)."""
    path = Path(path).resolve()
    info = read_info(path)
    return {"gguf_file": str(path), "sha256": file_sha256(path), "architecture": info.architecture,
            "tensor_types": info.tensor_types, "tokenizer_pre": info.tokenizer_pre, "name": info.name}


def model_source_record(name_or_path: str | None) -> dict | None:
    """:func:`source_record` when ``name_or_path`` is a GGUF reference, else None (cheap for other names)."""
    if not name_or_path:
        return None
    try:
        gguf = gguf_path_of(name_or_path)
    except UserError:
        return None
    return source_record(gguf) if gguf is not None else None


def materialize(path: str | Path, what: str = "model.name_or_path") -> Path:
    """The plain HF model directory converted from the GGUF file ``path`` (converted now when not cached).

    The first call dequantizes every tensor (transformers ``from_pretrained(..., gguf_file=)``), rebuilds a plain
    model from its config (no ``quantization_config``), and saves weights (fp32), tokenizer, chat template and
    ``gguf_source.json`` into ``<cache>/gguf/<sha256>-v1`` (written to a temporary sibling, then renamed: a killed
    conversion leaves nothing half-written). Later calls return the directory at once.

    Raises:
        UserError: an unsupported architecture / tensor type / tokenizer, or a file transformers cannot read.
    """
    path = Path(str(path)).expanduser().resolve()
    target = converted_dir(path)
    if (target / SOURCE_FILE).is_file() and (target / "config.json").is_file():
        return target
    info = read_info(path)
    check_supported(info)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("converting GGUF %s (%s, %s) to a cached HF directory %s: once per file, this takes a minute",
                path, info.architecture, ", ".join(f"{k}×{v}" for k, v in info.tensor_types.items()), target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        from tuneforge.utils import current_umask

        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        _convert(path, info, tmp, what)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / SOURCE_FILE).is_file():  # another process won the race: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_gguf(path: str | Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` read from a GGUF file by transformers' own GGUF loader, dequantized to fp32.

    The one place a GGUF file is read as a model: the conversion into a cached HF directory uses it, and so does the
    export's round-trip gate (an independent reader of the file tuneforge wrote). Exceptions are the loader's.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = str(Path(path).parent), Path(path).name
    tokenizer = read_gguf_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model, tokenizer


def read_gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer (with the chat template stored in the file) read from a GGUF file by transformers' GGUF loader,
    without its weights: the streamed export's gate checks a file whose model does not fit in memory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)


def _convert(path: Path, info: GGUFInfo, out: Path, what: str) -> None:
    try:
        loaded, tokenizer = read_gguf(path)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise UserError(f"{path} ({what}): transformers could not load this GGUF file: {exc}") from exc
    plain = plain_copy(loaded)
    del loaded
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"gguf_file": str(path), "sha256": file_sha256(path), "architecture": info.architecture,
              "name": info.name, "tensor_types": info.tensor_types, "tokenizer_model": info.tokenizer_model,
              "tokenizer_pre": info.tokenizer_pre, "converter_version": CONVERTER_VERSION}
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def plain_copy(model: Any) -> Any:
    """A plain (not quantized) model of the same class and config holding ``model``'s dense weights.

    transformers marks GGUF-loaded models quantized; their weights are dense float tensors already, so a model
    built from the config minus ``quantization_config`` takes the state dict unchanged and can be saved.
    """
    import torch

    config = model.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    clean = type(config).from_dict(config_dict)
    plain = type(model)(clean)  # on the CPU: non-persistent buffers (rotary inv_freq) are computed as usual
    state = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    result = plain.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise UserError(f"GGUF conversion: the dequantized weights do not fit a plain {type(model).__name__}: "
                        f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    plain.tie_weights()
    plain.eval()
    return plain


def source_of_dir(model_dir: str | Path) -> dict | None:
    """The ``gguf_source.json`` of a converted directory (which GGUF file it came from), or None."""
    file = Path(str(model_dir)) / SOURCE_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
