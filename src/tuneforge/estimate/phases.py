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
from tuneforge.models import memory
from tuneforge.models.memory import ELEMENT_BYTES  # noqa: F401  (re-exported: callers read it from here)

PHASES = ("merge", "export", "eval", "serve")
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
    return memory.kv_bytes_per_token(spec.num_layers, spec.num_kv_heads, spec.head_dim, element)


def adapter_params(spec: ModelSpec, r: int) -> int:
    """LoRA parameters of rank ``r`` on every linear layer except the output head (all-linear)."""
    return sum(r * (layer.in_features + layer.out_features) for layer in spec.linears if layer.kind != "head")


def phase_bill(spec: ModelSpec, phase: str, *, precision: str = "fp32", r: int = 16, quantize: str = "q8_0",
               batch_size: int = 8, seq_len: int = 2048, token_budget: int = 32768,
               generation: bool = False, prefix_tokens: int | None = None) -> PhaseBill:
    """The memory bill of ``phase`` for ``spec`` (the arithmetic: :mod:`tuneforge.models.memory`).

    Args:
        spec: the model (base) description.
        phase: ``merge`` (LoRA into the base, in memory, saved in ``precision``), ``export`` (merge, then
            ``quantize``: int8 | int4 for HF with its perplexity check over 4 windows of ``seq_len`` tokens,
            f16 | bf16 | q8_0 | q4_0 for GGUF with its reload gate), ``eval`` (``batch_size`` sequences of
            ``seq_len`` tokens scored, or generated when ``generation``, in ``precision``) or ``serve`` (weights in
            ``precision`` + a KV cache of ``token_budget`` tokens + one step's logits).
        precision: fp32 | bf16 | fp16.
        r: adapter rank (merge and export fold an adapter of this rank).
        quantize: export type.
        batch_size: eval rows per batch; serve rows per step.
        seq_len: eval tokens per row (generation: prompt + new tokens); export's perplexity-check window.
        token_budget: serve's KV budget in tokens (``tuneforge serve --token-budget``).
        prefix_tokens: tokens serve's prefix-reuse store holds (default: its bound beside ``token_budget``).
        generation: eval generates (KV cache of every row, last-position logits) instead of scoring
            (vocabulary-wide logits of every position).

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
    shape = {"vocab": spec.vocab_size, "hidden": spec.hidden_size, "intermediate": spec.intermediate_size}
    if phase == "export":
        check = None
        if quantize in ("int8", "int4"):
            check = memory.scoring_components(0, kv_bytes_per_token(spec, 4), rows=memory.CHECK_ROWS,
                                              tokens=seq_len, element=4, **shape)
        components = memory.export_components(params, adapter_params(spec, r), quantize, check=check,
                                              vocab=spec.vocab_size, largest_tensor=max(spec.param_numels, default=0),
                                              quantized_params=sum(lin.numel for lin in spec.linears
                                                                   if lin.kind != "head"),
                                              head_last=not spec.tie_word_embeddings)
        note = ("HF export: the quantized model is reloaded for its perplexity check after the merged one is freed"
                if check else "GGUF export: the written file is reloaded beside the merged model for the round-trip "
                "gate (the writer, one encoded tensor at a time, holds less)")
        return PhaseBill(spec.name, phase, components, [note])
    weights = int(params * element)
    kv = kv_bytes_per_token(spec, element)
    if phase == "eval":
        of = memory.generation_components if generation else memory.scoring_components
        components = of(weights, kv, rows=batch_size, tokens=seq_len, element=element, **shape)
        return PhaseBill(spec.name, phase, components, [f"{batch_size} rows x {seq_len} tokens; a smaller "
                                                        "--batch-size lowers the per-row lines"])
    activations = memory.serve_activation_bytes(spec.hidden_size, element)  # as the engine and serve's preflight
    weights += int(adapter_params(spec, r) * element)  # one served adapter, as serve's preflight bills it
    components = memory.serve_components(weights, kv, token_budget=token_budget, rows=batch_size,
                                         vocab=spec.vocab_size, activation_per_token=activations,
                                         prefix_tokens=prefix_tokens)
    return PhaseBill(spec.name, phase, components, [f"KV budget {token_budget:,} tokens ({kv:,} bytes of keys and "
                                                    f"values per token + {activations:,} of activations)"])


def _merge_bill(spec: ModelSpec, params: int, element: float, r: int) -> PhaseBill:
    """In memory (:func:`tuneforge.models.memory.merge_components`); the note prices the shard-by-shard merge."""
    components = memory.merge_components(params, adapter_params(spec, r), element, vocab=spec.vocab_size,
                                         largest_tensor=max(spec.param_numels, default=0))
    shard_elements = min(params, int(DEFAULT_SHARD_BYTES / element))
    fold = max((layer.numel for layer in spec.linears if layer.kind != "head"), default=0)
    # a shard of the saved precision, every tensor of it adapted (the most one shard can hold); the files on disk
    # give the exact per-shard figure (merge.sharded.estimate_merge_bytes)
    shard = memory.shard_merge_bytes(int(shard_elements * element), shard_elements, element, fold)
    sharded = sum(memory.sharded_merge_components([shard], adapter_params(spec, r), vocab=spec.vocab_size).values())
    notes = [f"shard by shard (tuneforge merge --strategy sharded): about {sharded / 2 ** 30:.2f} GiB with shards "
             f"of {shard_elements * element / 2 ** 30:.2f} GiB; smaller shards lower it"]
    return PhaseBill(spec.name, "merge", components, notes)
