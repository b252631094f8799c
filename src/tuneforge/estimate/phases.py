"""Memory bills of the phases after training: merge, export, evaluation/generation and serving.

Training has its bill (:mod:`tuneforge.estimate.bill`); the phases that follow load whole models and buffers too,
and a model that trained within a budget can still run out of memory in its merge (unsloth#1667). Each bill here
is computed from the model's :class:`~tuneforge.estimate.spec.ModelSpec` (its config on the meta device, no
weights) and lists its components in bytes, so ``tuneforge estimate MODEL --phase merge|export|eval|serve`` shows
what the command will hold at its peak. The merge command runs the same arithmetic on the files it is about to read
(:func:`tuneforge.merge.sharded.estimate_merge_bytes`) and picks the shard-by-shard merge when the whole model does
not fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.errors import UserError
from tuneforge.estimate.spec import ModelSpec

PHASES = ("merge", "export", "eval", "serve")
#: bytes per element of each saved/loaded precision or export type (GGUF block types include their scales)
ELEMENT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "f16": 2.0, "int8": 1.0, "int4": 0.5,
                 "q8_0": 34 / 32, "q4_0": 18 / 32}
#: the largest safetensors shard transformers writes by default (save_pretrained's max_shard_size)
DEFAULT_SHARD_BYTES = 50 * 10 ** 9


@dataclass
class PhaseBill:
    """A phase's estimated peak: ``components`` (name → bytes) sum to ``total_bytes``."""

    model: str
    phase: str
    components: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    def to_json(self) -> dict:
        return {"model": self.model, "phase": self.phase, "components": self.components,
                "total_bytes": self.total_bytes, "total_gib": round(self.total_bytes / 2 ** 30, 3),
                "notes": self.notes}


def kv_bytes_per_token(spec: ModelSpec, element: float) -> int:
    """Bytes of the key/value cache for one token across all layers."""
    return int(2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * element)


def adapter_params(spec: ModelSpec, r: int) -> int:
    """LoRA parameters of rank ``r`` on every linear layer except the output head (all-linear)."""
    return sum(r * (layer.in_features + layer.out_features) for layer in spec.linears if layer.kind != "head")


def phase_bill(spec: ModelSpec, phase: str, *, precision: str = "fp32", r: int = 16, quantize: str = "q8_0",
               batch_size: int = 8, seq_len: int = 2048, token_budget: int = 32768) -> PhaseBill:
    """The memory bill of ``phase`` for ``spec``.

    Args:
        spec: the model (base) description.
        phase: ``merge`` (LoRA into the base, in memory, saved in ``precision``), ``export`` (merge, then
            ``quantize``: int8 | int4 for HF, f16 | bf16 | q8_0 | q4_0 for GGUF with its reload gate), ``eval``
            (``batch_size`` sequences of ``seq_len`` tokens scored or generated in ``precision``) or ``serve``
            (weights in ``precision`` + a KV cache of ``token_budget`` tokens + one step's logits).
        precision: fp32 | bf16 | fp16.
        r: adapter rank (merge and export fold an adapter of this rank).
        quantize: export type.
        batch_size: eval rows per batch; serve rows per step.
        seq_len: eval tokens per row.
        token_budget: serve's KV budget in tokens (``tuneforge serve --token-budget``).

    Raises:
        UserError: an unknown phase, precision or export type.
    """
    if phase not in PHASES:
        raise UserError(f"--phase {phase!r}: choose one of {', '.join(PHASES)}")
    for option, value in (("--precision", precision), ("--quantize", quantize)):
        if value not in ELEMENT_BYTES:
            raise UserError(f"{option} {value!r}: choose one of {', '.join(ELEMENT_BYTES)}")
    params = spec.total_params
    element = ELEMENT_BYTES[precision]
    if phase == "merge":
        return _merge_bill(spec, params, element, r)
    if phase == "export":
        return _export_bill(spec, params, r, quantize)
    if phase == "eval":
        components = {"weights": int(params * element),
                      "kv cache": kv_bytes_per_token(spec, element) * batch_size * seq_len,
                      "logits (fp32)": 4 * batch_size * seq_len * spec.vocab_size}
        return PhaseBill(spec.name, phase, components, [f"{batch_size} rows x {seq_len} tokens; a smaller "
                                                        "--batch-size lowers the last two lines"])
    components = {"weights": int(params * element),
                  "kv cache (token budget)": kv_bytes_per_token(spec, element) * token_budget,
                  "logits (one step)": 4 * batch_size * spec.vocab_size}
    return PhaseBill(spec.name, phase, components, [f"KV budget {token_budget:,} tokens "
                                                    f"({kv_bytes_per_token(spec, element):,} bytes per token)"])


def _merge_bill(spec: ModelSpec, params: int, element: float, r: int) -> PhaseBill:
    """In memory: the base in fp32 with the adapter, a cast copy when saving below fp32, the save's bytes."""
    components = {"base weights (fp32)": 4 * params, "adapter (fp32)": 4 * adapter_params(spec, r)}
    if element != 4:
        components["merged copy in the saved precision"] = int(params * element)
    components["serialised shard bytes"] = int(min(params * element, DEFAULT_SHARD_BYTES))
    shard = min(params * element, DEFAULT_SHARD_BYTES)
    notes = [f"shard by shard (tuneforge merge --strategy sharded): about "
             f"{(2 * shard + 4 * adapter_params(spec, r)) / 2 ** 30:.2f} GiB with shards of "
             f"{shard / 2 ** 30:.2f} GiB; smaller shards lower it"]
    return PhaseBill(spec.name, "merge", components, notes)


def _export_bill(spec: ModelSpec, params: int, r: int, quantize: str) -> PhaseBill:
    """Merge in fp32, then the quantized copy; GGUF keeps the merged model while its reloaded file is checked."""
    components = {"merged model (fp32)": 4 * params, "adapter (fp32)": 4 * adapter_params(spec, r),
                  f"quantized weights ({quantize})": int(params * ELEMENT_BYTES[quantize])}
    notes = []
    if quantize in ("int8", "int4"):
        notes.append("HF export: the quantized model is reloaded for its perplexity check after the merged one is freed")
    else:
        components["gate: reloaded GGUF, dequantized (fp32)"] = 4 * params
        notes.append("GGUF export: the written file is reloaded beside the merged model for the round-trip gate")
    return PhaseBill(spec.name, "export", components, notes)
