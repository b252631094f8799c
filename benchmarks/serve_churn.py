"""Continuous batching in-process, one checkout's ``src`` against another's: the same workload through
``models.decoding.ContinuousBatch`` (no HTTP, no client on the CPU), timed, with the KV store's reallocations and
window moves counted. Written to check that sizing the KV store at admission (instead of doubling it) did not slow
decoding down; the HTTP load test (``benchmarks/serve_load.py``) was too noisy on the shared machine to show it.

Workload: ``REQUESTS`` greedy requests (prompts of 10-39 random token ids, one in five asking for 128 new tokens, the
others 16; seeded), kept at up to ``ROWS`` running rows, at most ``JOIN`` joining per step. Model: a from-config
Llama (hidden 256, 4 layers, vocabulary 2048) or ``MODEL_DIR`` (an HF directory, e.g. the cached conversion of
SmolLM2-135M-Instruct under ``~/.cache/tuneforge/gguf/``); the tokenizer is ``TOKENIZER_DIR`` (decoding only).

    git archive HEAD~1 src | tar -x -C /tmp/base
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_churn.py /tmp/base/src TOKENIZER_DIR [ROWS REQUESTS JOIN
    [MODEL_DIR]]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_churn.py src TOKENIZER_DIR ...   # alternate the two
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    src = str(Path(sys.argv[1]).resolve())
    sys.path.insert(0, src)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuneforge.models import decoding
    from tuneforge.models.decoding import ContinuousBatch, DecodeRow, Joining
    from tuneforge.models.sampling import GenerationSettings

    if not decoding.__file__.startswith(src):
        raise SystemExit(f"imported {decoding.__file__}, not the checkout {src}")
    rows, total, join = (int(a) for a in (sys.argv[3:6] + ["32", "200", "1000000000"][len(sys.argv[3:6]):]))
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
    torch.manual_seed(0)
    if len(sys.argv) > 6:
        model = LlamaForCausalLM.from_pretrained(sys.argv[6], dtype=torch.float32).eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=4, vocab_size=2048,
                                             max_position_embeddings=512)).eval()
    rng = random.Random(0)
    requests = [([rng.randrange(3, 2000) for _ in range(rng.randrange(10, 40))], 128 if rng.random() < 0.2 else 16)
                for _ in range(total)]
    counts = {"_allocate": 0, "_shift": 0}
    for name in counts:
        original = getattr(decoding._KVStore, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        setattr(decoding._KVStore, name, counted)
    batch = ContinuousBatch(model)
    pending, done, steps = list(enumerate(requests)), 0, 0
    started = time.perf_counter()
    while done < total:
        joining = []
        while pending and len(batch) + len(joining) < rows and len(joining) < join:
            i, (prompt, new) = pending.pop(0)
            joining.append(Joining(DecodeRow(prompt, GenerationSettings(max_new_tokens=new)), tokenizer, None, None, i))
        if joining:
            done += len(batch.add(joining))
        done += len(batch.step())
        steps += 1
    print(f"{src}: {time.perf_counter() - started:.2f} s, {steps} steps, {counts['_allocate']} reallocations, "
          f"{counts['_shift']} window moves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
