"""Read model tensors one at a time: from safetensors checkpoints, or a LoRA adapter materialised onto its base.

Only the tensor asked for is read (``safetensors.safe_open``), so a merge holds one tensor per input model in
memory, not whole models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError

INDEX = "model.safetensors.index.json"
# safetensors dtype codes → torch dtype attribute names
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
SINGLE = "model.safetensors"


class Checkpoint:
    """Lazy access to the tensors of an HF model directory saved as safetensors (single file or shards)."""

    def __init__(self, folder: str | Path, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        if (self.folder / INDEX).is_file():
            index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
            self._files = {name: self.folder / file for name, file in index["weight_map"].items()}
        elif (self.folder / SINGLE).is_file():
            for name in self._open(self.folder / SINGLE).keys():
                self._files[name] = self.folder / SINGLE
        else:
            found = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = f" (found {', '.join(found)}: load and re-save it with safe_serialization)" if found else ""
            raise UserError(f"{self.label}: no model.safetensors or {INDEX} in {self.folder}{hint}")

    def _open(self, file: Path):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def keys(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape without reading its data."""
        return tuple(self._open(self._files[name]).get_slice(name).get_shape())

    def get(self, name: str):
        """The tensor ``name`` (read now)."""
        return self._open(self._files[name]).get_tensor(name)

    def dtype(self, name: str):
        """The stored ``torch.dtype`` of ``name``, without reading its data."""
        import torch

        code = self._open(self._files[name]).get_slice(name).get_dtype()
        if code not in _DTYPE_NAMES:
            return self.get(name).dtype
        return getattr(torch, _DTYPE_NAMES[code])


class LoraOnBase:
    """A base checkpoint with a plain LoRA adapter folded in, tensor by tensor: W + scale · B A.

    Handles ``r``/``lora_alpha``, ``use_rslora`` (scale α/√r), ``rank_pattern``/``alpha_pattern``,
    ``fan_in_fan_out`` (GPT-2 Conv1D), LoRA on embeddings, and tensors the adapter saves whole
    (``modules_to_save``, resized embeddings). DoRA and non-LoRA adapters are refused (their merge is not a
    per-tensor additive delta): merge them first with ``tuneforge merge RUN --out DIR``.
    """

    def __init__(self, base: Checkpoint, adapter_dir: str | Path, adapter_config: dict, label: str | None = None):
        from safetensors.torch import load_file

        self.base = base
        self.label = label or str(adapter_dir)
        self.config = adapter_config
        adapter_dir = Path(adapter_dir)
        if adapter_config.get("peft_type") != "LORA" or adapter_config.get("use_dora"):
            kind = "DoRA" if adapter_config.get("use_dora") else adapter_config.get("peft_type")
            raise UserError(
                f"{self.label}: a {kind} adapter cannot be materialised tensor by tensor in a recipe; merge it "
                f"into its base first (`tuneforge merge {self.label} --out DIR`) and list DIR in the recipe"
            )
        file = adapter_dir / "adapter_model.safetensors"
        if not file.is_file():
            raise UserError(f"{self.label}: no adapter_model.safetensors in {adapter_dir}")
        self.lora: dict[str, dict[str, Any]] = {}  # base tensor name → {"A": ..., "B": ..., "module": ...}
        self.whole: dict[str, Any] = {}  # base tensor name → replacement tensor
        for key, tensor in load_file(str(file)).items():
            self._add(key, tensor)
        base_keys = set(base.keys())
        for name in [*self.lora, *self.whole]:
            if name not in base_keys:
                raise UserError(f"{self.label}: adapter tensor for {name!r} has no counterpart in base "
                                f"{base.label}; the adapter was trained on a different base model")

    def _add(self, key: str, tensor: Any) -> None:
        name = key.removeprefix("base_model.model.")
        match = re.match(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", name) or re.match(
            r"(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$", name)
        if match:
            module, part = match.groups()
            entry = self.lora.setdefault(f"{module}.weight", {"module": module})
            entry[part] = tensor
            return
        if "lora_" in name:
            raise UserError(f"{self.label}: unsupported adapter tensor {key!r} (only LoRA A/B matrices are merged)")
        self.whole[name.replace(".base_layer.", ".")] = tensor

    def keys(self) -> list[str]:
        return self.base.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.whole:
            return tuple(self.whole[name].shape)
        return self.base.shape(name)

    def get(self, name: str):
        """The tensor with the adapter folded in; adapted tensors come back in float32 (not rounded back to a
        half-precision base) so that the merge and the final cast round only once."""
        tensor = self.whole[name] if name in self.whole else self.base.get(name)
        if name in self.lora:
            delta = self.delta(name)
            if tuple(delta.shape) != tuple(tensor.shape):
                raise UserError(f"{self.label}: LoRA delta for {name!r} has shape {tuple(delta.shape)} but the base "
                                f"tensor has {tuple(tensor.shape)}; the adapter was trained on a different base")
            tensor = tensor.float() + delta
        return tensor

    def dtype(self, name: str):
        """The stored dtype of the base tensor (what an unmerged model would hold)."""
        return self.whole[name].dtype if name in self.whole else self.base.dtype(name)

    def delta(self, name: str):
        """scale · B A for the tensor ``name`` (float32, in the base tensor's layout)."""
        entry = self.lora[name]
        module = entry["module"]
        rank = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
        scale = alpha / (rank ** 0.5 if self.config.get("use_rslora") else rank)
        if "lora_embedding_A" in entry:
            return (entry["lora_embedding_B"].float() @ entry["lora_embedding_A"].float()).T * scale
        if "lora_A" not in entry or "lora_B" not in entry:
            raise UserError(f"{self.label}: adapter has only half of the LoRA pair for {module!r}")
        delta = (entry["lora_B"].float() @ entry["lora_A"].float()) * scale
        return delta.T if self.config.get("fan_in_fan_out") else delta


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's rank/alpha pattern lookup: the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def layer_index(name: str) -> int | None:
    """The transformer block index in a tensor name (``model.layers.3.``, ``transformer.h.3.``), or None."""
    match = re.search(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.", name)
    return int(match.group(1)) if match else None
