"""Peak memory of one training step with and without ``train.loss_chunk`` at a 128k vocabulary.

A small Llama (hidden 256, 2 layers) with Llama 3's vocabulary size (128,256 tokens, tied embeddings: the vocabulary
is 98% of its 34M parameters), LoRA r=8 on q/v, one batch of 2 × 512 tokens, every label supervised (the chunked
loss also skips unsupervised positions; not counted here). Each arm runs in its own process: the model is built,
the peak-RSS counter is reset (``/proc/self/clear_refs``), one full step (forward, loss, backward, AdamW step) runs,
and the step's peak above the RSS before it is reported, with the loss and the gradient norm, which must agree.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loss_chunk_memory.py [--chunks 512,256,128] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VOCAB = 128_256


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(key)


def run_arm(chunk: int, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.train.loss import captured_head_input, chunked_causal_lm_loss, output_head

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=args.length, tie_word_embeddings=True,
                         use_cache=False)
    model = get_peft_model(LlamaForCausalLM(config).to(dtype), LoraConfig(r=8, lora_alpha=16,
                                                                           target_modules=["q_proj", "v_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (args.batch, args.length), generator=gen)
    labels = input_ids.clone()

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    if chunk:
        _, head = output_head(model)
        with captured_head_input(head) as store:
            model(input_ids=input_ids)
        loss = chunked_causal_lm_loss(store["hidden"], head, labels, chunk)
    else:
        loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1e9)
    optimizer.step()
    peak = _status_kb("VmHWM")
    return {"loss_chunk": chunk or None, "loss": float(loss), "grad_norm": float(grad_norm),
            "rss_before_mb": round(before / 1024, 1), "step_peak_over_before_mb": round((peak - before) / 1024, 1),
            "peak_rss_mb": round(peak / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="512,256,128", help="chunk sizes to compare with the unchunked loss")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--arm", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm is not None:
        print(json.dumps(run_arm(args.arm, args)))
        return
    arms = []
    for chunk in [0, *(int(c) for c in args.chunks.split(","))]:
        out = subprocess.run([sys.executable, __file__, "--arm", str(chunk), "--batch", str(args.batch),
                              "--length", str(args.length), "--precision", args.precision],
                             check=True, capture_output=True, text=True).stdout
        arms.append(json.loads(out.strip().splitlines()[-1]))
        print(f"loss_chunk {chunk or 'off'}: {arms[-1]}", file=sys.stderr)
    base = arms[0]
    for arm in arms[1:]:
        arm["step_peak_ratio_vs_unchunked"] = round(base["step_peak_over_before_mb"] / arm["step_peak_over_before_mb"], 2)
        arm["loss_abs_diff"] = abs(arm["loss"] - base["loss"])
        arm["grad_norm_rel_diff"] = abs(arm["grad_norm"] - base["grad_norm"]) / base["grad_norm"]
    result = {"vocab": VOCAB, "batch": args.batch, "length": args.length, "precision": args.precision, "arms": arms}
    print(json.dumps(result, indent=2))
    lines = ["| loss | step peak over start (MB) | ratio | peak RSS (MB) | loss | grad norm |", "|---|---|---|---|---|---|"]
    for arm in arms:
        name = f"chunked ({arm['loss_chunk']})" if arm["loss_chunk"] else "unchunked"
        lines.append(f"| {name} | {arm['step_peak_over_before_mb']:,.0f} | "
                     f"{arm.get('step_peak_ratio_vs_unchunked', 1.0)}× | {arm['peak_rss_mb']:,.0f} | "
                     f"{arm['loss']:.6f} | {arm['grad_norm']:.6f} |")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
