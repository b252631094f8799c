"""The memory bill of one training setup: bytes per component and the peak they add up to.

Every formula is derived in ``docs/estimate.md``; the short version:

* weights: bytes/parameter by storage (fp32 4, bf16/fp16 2, NF4 0.5 + its quantization constants, int8 1 + row
  scales); LoRA adapters are kept in fp32 (peft upcasts them when the base is 16-bit).
* gradients: one per trainable parameter, in the trainable parameter's dtype.
* optimizer: AdamW m and v in fp32 (8 B/trainable), 8-bit Adam (2 B + fp32 absmax per 256-block, 32-bit state for
  tensors under 4096 elements), GaLore's projector + projected m, v; fp32 master weights under 16-bit mixed
  precision for full-parameter methods (Rajbhandari et al. 2020, "ZeRO": 2 + 2 + 12 bytes/parameter).
* activations: the tensors autograd saves in a Llama block (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", §4.1, adapted to RMSNorm, SwiGLU, SDPA and LoRA dropout),
  verified against a count of saved tensors (``tuneforge.estimate.measure.saved_activation_bytes``).
* logits: vocab × seq × batch, fp32 for the loss; three such tensors live at the start of backward (vocab ×
  ``loss_chunk`` with the chunked loss).
* temporaries: the gradients of one block during its backward, the optimizer step's temporaries.

The peak is the largest of four moments of a training step (end of forward / start of backward, the first and the
last block of backward, the optimizer step) — gradients and activations never coexist in full, so the components
shown do not simply add up; ``overlap`` (negative) is the difference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from tuneforge.config.schema import auto_loss_chunk
from tuneforge.errors import UserError
from tuneforge.estimate.spec import LinearShape, ModelSpec, resolve_targets
from tuneforge.methods.base import method_class, priced_methods

GiB = 1024**3
MiB = 1024**2

#: CUDA context + cuBLAS/cuDNN handles and workspaces: not counted by torch.cuda.max_memory_allocated but
#: taken from the card. 300-500 MB with torch 2.x lazy module loading; we bill 400 MiB.
CUDA_CONTEXT_BYTES = 400 * MiB

#: methods the bill models (each method's ``priced_as``: LoRA-family members that only change initialisation or
#: learning rates cost as LoRA)
METHODS = tuple(priced_methods())
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor")
PRECISIONS = ("fp32", "bf16", "fp16")

# Names the run config / HF Trainer use for the same optimizers.
OPTIM_ALIASES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw"}

#: data-parallel strategies: what each process keeps a 1/N share of (docs/estimate.md, "Several GPUs")
STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
_SHARDS = {  # strategy → (weights, gradients, optimizer state + master weights) sharded?
    "ddp": (False, False, False),
    "zero1": (False, False, True),
    "zero2": (False, True, True),
    "zero3": (True, True, True),
    "fsdp": (True, True, True),  # FULL_SHARD (distributed.fsdp.sharding: full_shard)
}
#: DeepSpeed's default reduce/allgather bucket (reduce_bucket_size = allgather_bucket_size = 5e8 elements)
DS_BUCKET_ELEMENTS = 500_000_000


@dataclass
class Setup:
    """One training setup to price. Defaults follow the CLI's defaults."""

    method: str = "lora"
    r: int = 16
    target_modules: str | list[str] = "all-linear"
    lora_dropout: float = 0.05
    batch_size: int = 2
    seq_len: int = 2048
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    precision: str = "bf16"
    optim: str = "adamw"
    device: str = "cuda"  # "cuda" (bill the CUDA context and fused-kernel dropout masks) or "cpu"
    quant_bits: int = 4
    double_quant: bool = True
    galore_rank: int = 128
    galore_layerwise: bool = False
    attn_implementation: str = "sdpa"  # "sdpa" (flash / memory-efficient kernels) or "eager" (s x s scores)
    gpus: int = 1  # data-parallel processes; the bill is per GPU
    strategy: str = "ddp"  # how the training state is spread over them: STRATEGIES
    loss_chunk: int | str | None = "auto"  # train.loss_chunk: logits exist for this many positions at a time

    def __post_init__(self) -> None:
        self.optim = OPTIM_ALIASES.get(self.optim, self.optim)
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r}: the estimator models {', '.join(METHODS)}")
        if self.optim not in OPTIMIZERS:
            raise UserError(f"--optim {self.optim!r}: the estimator models {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        for key in ("r", "batch_size", "seq_len", "grad_accum", "galore_rank"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key} must be positive (got {getattr(self, key)})")
        self._check_strategy()

    def _check_strategy(self) -> None:
        if self.gpus < 1:
            raise UserError(f"--gpus {self.gpus}: expected at least 1")
        if self.strategy not in STRATEGIES:
            raise UserError(f"--strategy {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if self.strategy == "ddp":
            return
        # The same refusals as training (tuneforge.train.distributed.check_strategy).
        if self.priced_as == "galore":
            raise UserError(f"--strategy {self.strategy} with GaLore: its optimizer needs whole, unsharded gradients; "
                            "use --strategy ddp")
        if self.priced_as == "qlora" and self.strategy in ("zero3", "fsdp"):
            raise UserError(f"--strategy {self.strategy} with QLoRA: the 4-bit weights cannot be sharded as tuneforge "
                            "loads them; use --strategy zero2 or ddp")

    @property
    def priced_as(self) -> str:
        """The cost model of the method: ``full``, ``galore``, ``lora``, ``dora`` or ``qlora``."""
        return method_class(self.method).priced_as

    @property
    def full_parameter(self) -> bool:
        """Whether every parameter trains (full fine-tuning, GaLore)."""
        return self.priced_as in ("full", "galore")

    @property
    def act_bytes(self) -> int:
        """Bytes of one activation element (the compute dtype)."""
        return 4 if self.precision == "fp32" else 2

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass
class Bill:
    """The estimate. ``components`` (name → bytes) sum exactly to ``total_bytes``."""

    model: str
    total_params: int
    trainable_params: int
    components: dict[str, int]
    total_bytes: int
    phases: dict[str, int]
    peak_phase: str
    setup: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GiB

    def to_json(self) -> dict:
        """One JSON-serialisable object (what ``tuneforge estimate --json`` prints)."""
        data = asdict(self)
        data["total_gib"] = round(self.total_gb, 3)
        return data


# --------------------------------------------------------------------------- parameters


def lora_trainable(spec: ModelSpec, setup: Setup) -> list[tuple[int, int]]:
    """The (A, B) element counts of every LoRA adapter: ``r·in`` and ``out·r`` per targeted linear (exact)."""
    targets = resolve_targets(spec, setup.target_modules)
    return [(setup.r * lin.in_features, lin.out_features * setup.r) for lin in targets]


def trainable_tensors(spec: ModelSpec, setup: Setup) -> list[int]:
    """Element counts of every trainable tensor (for per-tensor optimizer rules such as 8-bit Adam's)."""
    if setup.full_parameter:
        return list(spec.param_numels)
    tensors = [n for pair in lora_trainable(spec, setup) for n in pair]
    if setup.priced_as == "dora":  # one magnitude vector (out_features) per adapted layer
        tensors += [lin.out_features for lin in resolve_targets(spec, setup.target_modules)]
    return tensors


def _quantized_linears(spec: ModelSpec) -> list[LinearShape]:
    # transformers' bitsandbytes integration keeps the output head (and embeddings, norms) unquantized.
    return [lin for lin in spec.linears if lin.kind != "head"]


def weight_bytes(spec: ModelSpec, setup: Setup, trainable: int) -> tuple[int, str]:
    """Bytes of the weights as stored (adapters included) and a one-line explanation."""
    dtype_bytes = setup.act_bytes
    if setup.full_parameter:
        return spec.total_params * dtype_bytes, f"{spec.total_params:,} params x {dtype_bytes} B"
    adapters = trainable * 4  # peft keeps adapter weights in fp32 (autocast_adapter_dtype=True)
    if setup.priced_as != "qlora":
        return spec.total_params * dtype_bytes + adapters, f"base x {dtype_bytes} B + adapters x 4 B (fp32)"
    quant = _quantized_linears(spec)
    q_params = sum(lin.numel for lin in quant)
    rest = spec.total_params - q_params - sum(lin.out_features for lin in quant if lin.bias)
    biases = sum(lin.out_features for lin in quant if lin.bias) * dtype_bytes
    if setup.quant_bits == 4:
        # NF4: 4 bits/weight + one absmax per 64-weight block: fp32 (4 B), or with double quantization an int8
        # code per block plus an fp32 absmax per 256 blocks (Dettmers et al. 2023, §3).
        blocks = sum(math.ceil(lin.numel / 64) for lin in quant)
        consts = blocks * 1 + math.ceil(blocks / 256) * 4 * 2 if setup.double_quant else blocks * 4
        qbytes = q_params // 2 + consts
        how = f"{q_params:,} params in NF4 ({qbytes / q_params:.4f} B/param incl. constants)"
    else:
        # LLM.int8: 1 B/weight + an fp32 scale per output row (Dettmers et al. 2022).
        qbytes = q_params + sum(lin.out_features * 4 for lin in quant)
        how = f"{q_params:,} params in int8 + row scales"
    return qbytes + biases + rest * dtype_bytes + adapters, how + f"; {rest:,} unquantized x {dtype_bytes} B"


def optimizer_bytes(spec: ModelSpec, setup: Setup, tensors: list[int]) -> tuple[int, str]:
    """Bytes of optimizer state for the trainable tensors."""
    if setup.priced_as == "galore":
        return _galore_bytes(spec, setup)
    return _plain_optimizer_bytes(setup.optim, tensors)


def _plain_optimizer_bytes(optim: str, tensors: list[int]) -> tuple[int, str]:
    n = sum(tensors)
    if optim == "adamw":
        return 8 * n, "AdamW m + v in fp32: 8 B/trainable param"
    if optim in ("adamw_8bit", "paged_adamw_8bit"):
        # bitsandbytes: int8 m and v with one fp32 absmax per 256-element block each; tensors under
        # min_8bit_size (4096) keep 32-bit states.
        total = 0
        for numel in tensors:
            if numel < 4096:
                total += 8 * numel
            else:
                total += 2 * numel + 2 * 4 * math.ceil(numel / 256)
        return total, "8-bit Adam: 2 B/param + fp32 absmax per 256-block (fp32 states under 4096 elements)"
    if optim == "adafactor":
        # Factored second moment: a row and a column vector per matrix; no first moment (beta1=None).
        return _adafactor(tensors), "Adafactor: factored second moment (rows + columns), no momentum"
    return 0, "SGD without momentum: no state"


def _adafactor(tensors: list[int]) -> int:
    # Without shapes we bound each tensor's factored state by 2·sqrt(numel) floats (square-matrix case).
    return sum(int(8 * math.sqrt(n)) for n in tensors)


def _galore_bytes(spec: ModelSpec, setup: Setup) -> tuple[int, str]:
    # GaLore (Zhao et al. 2024): each targeted matrix m x n keeps a projector (rank x min(m, n)) and Adam m, v
    # of the projected gradient (rank x max(m, n)); the other parameters keep ordinary AdamW states.
    targets = resolve_targets(spec, setup.target_modules)
    projected = 0
    covered = 0
    for lin in targets:
        rank = min(setup.galore_rank, lin.in_features, lin.out_features)
        small, big = sorted((lin.in_features, lin.out_features))
        projected += 4 * (rank * small + 2 * rank * big)
        covered += lin.numel
    rest = sum(spec.param_numels) - covered
    rest_bytes, _ = _plain_optimizer_bytes("adamw" if setup.optim != "adamw_8bit" else "adamw_8bit", [rest])
    return projected + rest_bytes, (
        f"GaLore rank {setup.galore_rank}: projector + projected m, v on {len(targets)} matrices; AdamW on the rest")


# --------------------------------------------------------------------------- activations


def _saves_input(full: bool, targeted: dict[str, float], names: tuple[str, ...]) -> bool:
    """Whether a linear's input is kept: by a trainable weight's matmul, or by a dropout-free LoRA A."""
    return full or any(targeted.get(n, 1.0) == 0.0 for n in names)


def layer_activation_bytes(spec: ModelSpec, setup: Setup) -> tuple[int, int]:
    """Bytes autograd saves per token in one transformer block, without and with gradient checkpointing.

    Returns ``(saved_per_token, checkpointed_per_token)``: the second is what a checkpointed block keeps (its
    input); the first is also what a checkpointed block holds again while it is recomputed in backward.
    """
    if spec.family != "llama":
        return _korthikanti_bytes(spec, setup), setup.act_bytes * spec.hidden_size
    h, inter, a = spec.hidden_size, spec.intermediate_size, setup.act_bytes
    q_dim, kv_dim = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    full = setup.full_parameter
    targeted = _targeted_dropout(spec, setup)
    mask_bytes = a if setup.device == "cpu" else 1  # CPU dropout multiplies by a saved float mask; CUDA saves bool
    total = 0
    for attn_part in (True, False):
        # RMSNorm (computed in fp32): its fp32 input (pow), the normalized x if the norm weight trains,
        # and its output if the next matmul needs it.
        total += 4 * h + (a * h if full else 0) + 4  # + the fp32 rsqrt, one per token
        names = ("q_proj", "k_proj", "v_proj") if attn_part else ("gate_proj", "up_proj")
        if _saves_input(full, targeted, names):
            total += a * h
    # Attention: q, k after rotary, v, the SDPA output (= o_proj input), the fp32 log-sum-exp per head.
    total += a * (2 * q_dim + 2 * kv_dim) + 4 * spec.num_heads
    if setup.attn_implementation == "eager":  # the s x s probabilities: fp32 softmax output (+ a 16-bit copy)
        total += spec.num_heads * setup.seq_len * (4 if a == 4 else 6) - 4 * spec.num_heads
    # SwiGLU MLP: gate output (SiLU input), SiLU output, up output; their product if down_proj needs it.
    total += 3 * a * inter + (a * inter if _saves_input(full, targeted, ("down_proj",)) else 0)
    # LoRA: each adapter keeps A's output (r); with dropout also the dropped input and its mask.
    for lin in _first_block(resolve_targets(spec, setup.target_modules)) if not full else []:
        total += a * setup.r
        if setup.lora_dropout > 0:
            total += (a + mask_bytes) * lin.in_features
    return total, a * h


def _first_block(linears: list[LinearShape]) -> list[LinearShape]:
    """The linears of block 0 (``model.layers.0.self_attn.q_proj``): every block has the same ones."""
    return [lin for lin in linears if "0" in lin.name.split(".")]


def _targeted_dropout(spec: ModelSpec, setup: Setup) -> dict[str, float]:
    """Leaf name → LoRA dropout for the targeted linears (empty for full-parameter methods)."""
    if setup.full_parameter:
        return {}
    return {lin.name.rsplit(".", 1)[-1]: setup.lora_dropout for lin in resolve_targets(spec, setup.target_modules)}


def _korthikanti_bytes(spec: ModelSpec, setup: Setup) -> int:
    # GPT-2-style blocks: Korthikanti et al. 2022 eq. (1), 34·h + 5·a·s bytes per token in 16-bit with 1-byte
    # dropout masks, scaled to the compute dtype (not calibrated here: only Llama blocks are measured).
    per16 = 34 * spec.hidden_size + 5 * spec.num_heads * setup.seq_len
    return per16 * setup.act_bytes // 2


# --------------------------------------------------------------------------- the bill


def estimate_memory(spec: ModelSpec, setup: Setup) -> Bill:
    """Price ``setup`` on ``spec``: per-component bytes and the peak over one training step.

    Raises:
        UserError: a method the model cannot take (e.g. target modules it does not have).
    """
    tokens, a = setup.tokens, setup.act_bytes
    full = setup.full_parameter
    tensors = trainable_tensors(spec, setup)
    trainable = sum(tensors)
    weights, weights_how = weight_bytes(spec, setup, 0 if full else trainable)
    master = 4 * trainable if full and setup.precision != "fp32" else 0
    grad_elem = a if full else 4
    grads = trainable * grad_elem
    if setup.priced_as == "galore" and setup.galore_layerwise:
        grads = max(spec.param_numels) * grad_elem  # each gradient is consumed by its hook and freed
    optim, optim_how = optimizer_bytes(spec, setup, tensors)

    per_layer, ckpt_per_layer = layer_activation_bytes(spec, setup)
    layers = spec.num_layers
    keep_per_layer = ckpt_per_layer if setup.gradient_checkpointing else per_layer
    act_layers = keep_per_layer * tokens * layers
    recompute = per_layer * tokens if setup.gradient_checkpointing else 0
    # After the last block: the final norm's fp32 input (+ normalized x, + output when the head trains).
    act_final = tokens * (4 * spec.hidden_size + (2 * a * spec.hidden_size if full else 0))
    activations = act_layers + act_final + recompute

    # Logits: the loss upcasts to fp32; at the start of backward the saved log-softmax, its incoming gradient
    # and its outgoing gradient (all b·s·V fp32) are alive together.
    # train.loss_chunk (train/loss.py): only one chunk's logits exist at a time, forward or (recomputed) backward.
    chunk = {"auto": auto_loss_chunk(spec.vocab_size), "off": None}.get(setup.loss_chunk, setup.loss_chunk)
    logit_rows = min(tokens, chunk) if chunk else tokens
    logits_unit = logit_rows * spec.vocab_size * 4
    logits = 3 * logits_unit
    head = spec.head
    head_grad = head.numel * grad_elem if (full and head is not None) else 0

    # One block's backward: the gradients flowing through the MLP (3 of b·s·I) and the residual stream (2 of b·s·h).
    block_tmp = tokens * a * (3 * spec.intermediate_size + 2 * spec.hidden_size)
    if setup.priced_as == "qlora":  # a dequantized copy of the largest 4/8-bit weight while it multiplies
        block_tmp += max(lin.numel for lin in _quantized_linears(spec)) * a
    if setup.gradient_checkpointing:
        # Calibration (benchmarks/estimate_accuracy.py): recomputing a block's forward inside backward adds that
        # forward's own temporaries, measured at about one more set of block temporaries.
        block_tmp *= 2
    step_tmp = _step_temporaries(spec, setup, tensors)
    grads_layers = grads - head_grad if not (setup.priced_as == "galore" and setup.galore_layerwise) else 0
    grad_per_layer = grads_layers / max(layers, 1)
    held_grads = grads if setup.grad_accum > 1 else 0  # accumulation keeps gradients across micro-batches

    weights, master, grads, optim, head_grad, dist_bytes, dist_how = _share_per_gpu(
        spec, setup, weights, master, grads, optim, head_grad, grad_elem)
    if setup.gpus > 1 and setup.strategy != "ddp":
        grads_layers = grads - head_grad if not (setup.priced_as == "galore" and setup.galore_layerwise) else 0
        grad_per_layer = grads_layers / max(layers, 1)
        held_grads = grads if setup.grad_accum > 1 else 0
        step_tmp = step_tmp / setup.gpus  # each rank steps its own partition of the optimizer
    static = weights + master + optim + dist_bytes
    phases = {
        "backward start": static + held_grads + act_layers + act_final + max(logits, logits_unit + head_grad),
        "first block backward": static + max(held_grads, head_grad + grad_per_layer) + act_layers + act_final
        - keep_per_layer * tokens + per_layer * tokens + block_tmp,
        "last block backward": static + max(held_grads, head_grad + grads_layers) + keep_per_layer * tokens
        + per_layer * tokens * setup.gradient_checkpointing + block_tmp,
        "optimizer step": static + grads + step_tmp,
    }
    phases = {k: int(v) for k, v in phases.items()}
    peak_phase = max(phases, key=phases.get)
    overhead = CUDA_CONTEXT_BYTES if setup.device == "cuda" else 0
    total = phases[peak_phase] + overhead
    components = {
        "weights": int(weights),
        "master_weights": int(master),
        "gradients": int(grads),
        "optimizer": int(optim),
        "activations": int(activations),
        "logits": int(logits),
        "temporaries": int(max(block_tmp, step_tmp)),
        "framework": int(overhead),
        "distributed": int(dist_bytes),
    }
    components["overlap"] = int(total - sum(components.values()))
    notes = [
        f"weights: {weights_how}",
        f"optimizer: {optim_how}",
        f"activations: {per_layer / 1024:.1f} KiB/token/block saved"
        + (f", {ckpt_per_layer / 1024:.1f} KiB kept per checkpointed block" if setup.gradient_checkpointing else ""),
        f"peak at: {peak_phase}",
        *([f"per GPU of {setup.gpus}, {setup.strategy}: {dist_how}"] if setup.gpus > 1 else []),
    ]
    return Bill(
        model=spec.name, total_params=spec.total_params, trainable_params=trainable, components=components,
        total_bytes=int(total), phases=phases, peak_phase=peak_phase, setup=asdict(setup), notes=notes,
    )


def _share_per_gpu(spec: ModelSpec, setup: Setup, weights: float, master: float, grads: float, optim: float,
                   head_grad: float, grad_elem: int) -> tuple:
    """One GPU's share of the training state under ``setup.strategy`` on ``setup.gpus`` processes.

    Returns ``(weights, master, grads, optim, head_grad, buffers, how)``. ZeRO-1 shards the optimizer state and the
    fp32 master weights, ZeRO-2 also the gradients, ZeRO-3 and FSDP (full shard) also the weights (Rajbhandari et
    al. 2020). ``buffers`` are what the engine adds: DDP's gradient buckets (a second copy of the gradients),
    DeepSpeed's reduce/all-gather buckets, and under ZeRO-3/FSDP the full weights of the block being computed and
    of the one prefetched.
    """
    n = setup.gpus
    if n <= 1:
        return weights, master, grads, optim, head_grad, 0, ""
    shard_weights, shard_grads, shard_optim = _SHARDS[setup.strategy]
    trainable_grads = grads
    if shard_optim:
        master, optim = master / n, optim / n
    if shard_grads:
        grads, head_grad = grads / n, head_grad / n
    block = 0
    if shard_weights:
        weights = weights / n
        body = spec.total_params - spec.embedding_params - (spec.head.numel if spec.head is not None
                                                              and not spec.tie_word_embeddings else 0)
        block = 2 * setup.act_bytes * body / max(spec.num_layers, 1)  # the block computed + the one prefetched
    if setup.strategy == "ddp":
        buffers = trainable_grads  # gradient buckets: DDP all-reduces a flat copy of every gradient
        how = "weights, gradients and optimizer state replicated; + gradient buckets (a copy of the gradients)"
    elif setup.strategy == "fsdp":
        buffers = block
        how = "weights, gradients, optimizer state / N; + 2 blocks' gathered weights"
    else:
        # ZeRO's gradient bucket: at most reduce_bucket_size (5e8) elements, in the gradients' dtype.
        bucket = min(trainable_grads, DS_BUCKET_ELEMENTS * grad_elem)
        buffers = bucket + block
        what = {"zero1": "optimizer state", "zero2": "optimizer state and gradients",
                "zero3": "weights, gradients and optimizer state"}[setup.strategy]
        how = f"{what} / N; + DeepSpeed buckets" + (" + 2 blocks' gathered weights" if block else "")
    return weights, master, grads, optim, head_grad, int(buffers), how


def _step_temporaries(spec: ModelSpec, setup: Setup, tensors: list[int]) -> int:
    if setup.optim != "adamw" or setup.priced_as == "galore":
        return 4 * max(tensors)  # one fp32 temporary of the largest tensor (dequantized state / projection)
    if setup.device == "cuda":
        # torch's default multi-tensor (foreach) AdamW on CUDA builds sqrt(v) for all parameters at once.
        return 4 * sum(tensors)
    # CPU: the single-tensor loop makes sqrt(v) and sqrt(v)/bias_correction for one tensor at a time.
    return 2 * 4 * max(tensors)
