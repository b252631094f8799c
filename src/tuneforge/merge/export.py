"""Export a run or model with int8 / int4 weight-only quantization, and measure what it costs in perplexity.

Quantization is bitsandbytes' (LLM.int8() for ``int8``, NF4 with double quantization for ``int4``): it runs on
CPU here and ``save_pretrained`` writes a directory that stock transformers (``AutoModelForCausalLM``) loads again (bitsandbytes installed). An adapter run is merged into its base first (quantized models cannot take a
merge afterwards). The exported directory is reloaded before it is kept, and its perplexity on a small text set
(``tuneforge.evaluate.perplexity``, the one ``tuneforge eval`` reports) is compared with the unquantized model's.
"""

from __future__ import annotations

import gc
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError
from tuneforge.merge.lora import (
    check_mergeable,
    copy_template_files,
    load_base_and_adapter,
    local_ref,
    logit_difference,
    logits_on,
    probe_batches,
)
from tuneforge.utils import atomic_dir, atomic_write_json, prepare_output

QUANTIZE = ("int8", "int4")


def default_texts(limit: int = 60) -> list[str]:
    """Paragraphs of the Python documentation shipped with Python (``pydoc_data``), a fixed offline text set."""
    from pydoc_data.topics import topics

    texts = []
    for key in sorted(topics):
        texts.extend(p.strip() for p in topics[key].split("\n\n") if len(p.strip()) > 80)
    # every 7th paragraph: spread over topics rather than the first few alphabetically
    return texts[::7][:limit]


def read_texts(path: str | Path) -> list[str]:
    """Texts for the perplexity check: a .txt file (paragraphs split on blank lines) or .jsonl with ``text``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path}: no such file")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path}:{number}: expected an object with a \"text\" string")
            texts.append(record["text"])
    else:
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise UserError(f"--data {path}: no text found")
    return texts


def perplexity(model: Any, tokenizer: Any, texts: list[str]) -> float:
    """Token-weighted perplexity of ``model`` on ``texts`` (``tuneforge.evaluate.perplexity``, each text a record).

    Raises:
        UserError: no text has a token to score.
    """
    from tuneforge.evaluate.perplexity import perplexity as evaluate_perplexity

    try:
        return evaluate_perplexity(model, tokenizer, [{"text": text} for text in texts]).ppl
    except ValueError:
        raise UserError("the perplexity text set is empty after tokenisation; give a longer --data file") from None


def quantization_config(kind: str):
    """The ``BitsAndBytesConfig`` for ``int8`` or ``int4`` (NF4, double quant, fp32 compute on CPU)."""
    import torch
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def check_memory(source: Any, quantize: str, max_memory: int | None, echo=print,
                 texts: list[str] | None = None) -> dict[str, int]:
    """The int8/int4 export's memory preflight: print the estimate and refuse when it does not fit.

    The estimate is :func:`tuneforge.models.memory.export_components` (the bill of ``tuneforge estimate --phase
    export``) on the safetensors headers and the perplexity check of ``texts``: the merged model in fp32 (then its
    saved file, mapped while bitsandbytes quantizes from it), the adapter, the tokenizer, and the larger of the
    check's activations (its widest batch of windows, :func:`check_windows`) and the quantized model. There is no
    lower-memory way to run bitsandbytes' quantizer, so a model that does not fit is refused; ``--format gguf``
    streams tensor by tensor.

    Returns:
        ``{"need": bytes, "budget": bytes}`` (``{}`` when the base is not local safetensors: no estimate).

    Raises:
        UserError: the estimate is above the budget (naming both and ``--max-memory``).
    """
    from tuneforge.merge.gguf import _vocab_of, safetensors_shapes, weights_dir_of
    from tuneforge.merge.sharded import file_elements
    from tuneforge.models.memory import export_components, memory_budget, model_numbers, scoring_components

    weights = weights_dir_of(source)
    if weights is None:
        echo(f"export memory: no estimate (the base {source.base} is not a local safetensors directory)")
        return {}
    budget = memory_budget(max_memory)
    shapes = {name: shape for name, (shape, _) in safetensors_shapes(weights).items()}
    total = sum(_numel(shape) for shape in shapes.values())
    # bitsandbytes quantizes the linear layers; embeddings, norms and the head stay fp32
    linear = sum(_numel(shape) for name, shape in shapes.items()
                 if len(shape) == 2 and "embed" not in name and not name.startswith("lm_head"))
    adapter_file = Path(source.adapter) / "adapter_model.safetensors" if source.adapter else None
    adapter = file_elements(adapter_file) if adapter_file and adapter_file.is_file() else 0
    check, what = None, "the perplexity check not billed: no texts"
    if texts:
        numbers = model_numbers(source)
        rows, tokens = check_windows(source, texts)
        check = scoring_components(0, numbers.kv_per_token(4), rows=rows, tokens=tokens, element=4,
                                   **numbers.shape())
        what = f"the perplexity check's widest batch {rows} x {tokens} tokens"
    parts = export_components(total, adapter, quantize, vocab=_vocab_of(weights), quantized_params=linear,
                              check=check)
    need = int(sum(parts.values()))
    gib = 1024 ** 3
    echo(f"export memory: estimated peak {need / gib:.2f} GiB (merged fp32, adapter, tokenizer, and the larger of "
         f"{what} and the quantized model); budget {budget / gib:.2f} GiB")
    if need > budget:
        raise UserError(f"export --quantize {quantize} needs about {need / gib:.2f} GiB, above the budget of "
                        f"{budget / gib:.2f} GiB, and bitsandbytes quantizes the whole model in memory; free memory, "
                        "raise --max-memory, or export --format gguf (which streams tensor by tensor)")
    return {"need": need, "budget": budget}


def check_windows(source: Any, texts: list[str]) -> tuple[int, int]:
    """``(rows, tokens)`` of the perplexity check's widest forward pass on ``texts``: the windows
    ``tuneforge.evaluate.perplexity`` cuts (as eval's preflight sizes them,
    :func:`tuneforge.evaluate.preflight.scoring_windows`), :data:`tuneforge.models.memory.CHECK_ROWS` at a time.
    Reads the tokenizer and config only."""
    from tuneforge.evaluate.preflight import scoring_windows
    from tuneforge.models.memory import CHECK_ROWS

    width, count = scoring_windows(source, [{"text": text} for text in texts], None, None)
    return min(CHECK_ROWS, count), width


def _numel(shape: Any) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def export_model(path: str | Path, out: str | Path, *, quantize: str = "int8", data: str | None = None,
                 force: bool = False, echo=print, max_memory: int | None = None) -> dict:
    """Quantize a run / adapter / model directory and save it at ``out`` (atomically).

    ``out`` must not be, hold or lie inside the source, its run or its base; an existing non-empty ``out`` is
    replaced only with ``force`` (:func:`tuneforge.utils.prepare_output`).

    Returns:
        ``{"quantize", "ppl_original", "ppl_quantized", "ppl_delta", "ppl_ratio", "logit_max_diff",
        "logit_mean_diff", "bytes_original", "bytes_quantized", "texts"}`` (also written to ``out/export_report.json``).

    Raises:
        UserError: unknown ``quantize``, an already quantized model, a non-mergeable adapter, bitsandbytes
            missing, or a bad ``data`` file.
    """
    import torch

    if quantize not in QUANTIZE:
        raise UserError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    source = local_ref(path)
    prepare_output(out, [path, source.model_dir, source.run_dir, source.base, data], force=force)
    texts = read_texts(data) if data else default_texts()
    memory = check_memory(source, quantize, max_memory, echo, texts=texts)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("export needs bitsandbytes: pip install 'tuneforge[quant]'") from None
    from tuneforge.models.reference import load_for_inference, load_model_dir

    if source.kind == "model" and source.quantization():
        raise UserError(f"{path}: already quantized ({source.quantization().get('quant_method')}); "
                        "export from the unquantized model")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent if out.parent.exists() else None) as work:
        if source.kind == "adapter":
            check_mergeable(source)
            peft_model, tokenizer, _ = load_base_and_adapter(source)
            model = peft_model.merge_and_unload()
            del peft_model  # it still references the merged model, which must go before the quantized one loads
            model.save_pretrained(work)  # the quantizer loads from a directory
            origin = Path(work)
        else:
            loaded = load_for_inference(source, device="cpu", dtype=torch.float32)
            model, tokenizer, origin = loaded.model, loaded.tokenizer, source.model_dir
        model.eval()
        ppl_original = perplexity(model, tokenizer, texts)
        probes = probe_batches(tokenizer)
        logits_original = logits_on(model, probes)
        bytes_original = _weight_bytes(model)
        del model
        gc.collect()  # the merged fp32 model is freed before the quantized one loads (peft/HF modules hold cycles)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bitsandbytes warns on every CPU matmul that it casts inputs
            quantized = load_model_dir(origin, quantization_config(quantize))
            with atomic_dir(out) as tmp:
                quantized.save_pretrained(tmp)
                del quantized  # the check reads what was written: one quantized copy at a time
                tokenizer.save_pretrained(tmp)
                copy_template_files(source, tmp)
                # the check that matters: what was written loads again (stock from_pretrained underneath)
                reloaded = load_model_dir(tmp)
                reloaded.eval()
                ppl_quantized = perplexity(reloaded, tokenizer, texts)
                max_diff, mean_diff = logit_difference(logits_original, logits_on(reloaded, probes))
                report = {
                    "source": str(path), "quantize": quantize, "method": "bitsandbytes "
                    + ("LLM.int8()" if quantize == "int8" else "NF4 + double quant"),
                    "ppl_original": ppl_original, "ppl_quantized": ppl_quantized,
                    "ppl_delta": ppl_quantized - ppl_original, "ppl_ratio": ppl_quantized / ppl_original,
                    "logit_max_diff": max_diff, "logit_mean_diff": mean_diff,
                    "bytes_original": bytes_original, "bytes_quantized": _dir_bytes(tmp),
                    "texts": len(texts), "data": str(data) if data else "builtin:pydoc_data",
                    "memory_estimate": memory.get("need"), "memory_budget": memory.get("budget"),
                }
                atomic_write_json(tmp / "export_report.json", report)
    echo(f"{quantize}: perplexity {ppl_original:.3f} → {ppl_quantized:.3f} "
         f"(delta {report['ppl_delta']:+.3f}, ×{report['ppl_ratio']:.4f}); logits max diff {max_diff:.3g}; weights "
         f"{bytes_original / 1e6:.2f} MB → {report['bytes_quantized'] / 1e6:.2f} MB; written to {out}")
    return report


def _weight_bytes(model: Any) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
