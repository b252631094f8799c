"""How close is `tuneforge estimate` to the real peak memory of training steps?

Each configuration trains a from-config Llama (23M parameters: hidden 512, 6 layers, SwiGLU 1376, vocab 8000,
fp32) for two steps (the second step runs with the optimizer state allocated) in a fresh process and measures
the peak memory above the process's baseline (CPU: resident-set high-water mark with a fixed glibc mmap threshold;
CUDA: ``torch.cuda.max_memory_allocated``; the method is described in ``tuneforge.estimate.measure``). It prints a
table and one JSON line per configuration, then the worst error.

Usage: ``.venv/bin/python benchmarks/estimate_accuracy.py [--quick] [--json-out FILE]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time

MODEL = dict(hidden=512, intermediate=1376, layers=6, heads=8, vocab=8000, tie=True)

# (method, batch, seq_len, gradient checkpointing, extra)
CONFIGS = [
    ("full", 2, 256, False, {}),
    ("full", 4, 256, False, {}),
    ("full", 2, 512, True, {}),
    ("full", 2, 256, False, {"optim": "adamw_8bit"}),
    ("lora", 2, 256, False, {"dropout": 0.05}),
    ("lora", 4, 256, False, {"dropout": 0.0, "r": 16}),
    ("lora", 2, 512, True, {"dropout": 0.05}),
    ("lora", 8, 128, False, {"dropout": 0.05, "targets": "attention"}),
    ("qlora", 2, 256, False, {"dropout": 0.05}),
    ("qlora", 4, 256, True, {"dropout": 0.05}),
]


def jobs(quick: bool, only: str | None = None) -> list[dict]:
    chosen = CONFIGS[::3] if quick else CONFIGS
    chosen = [c for c in chosen if only is None or c[0] == only]
    return [dict(MODEL, method=m, batch=b, seq_len=s, gc=g, steps=2, **extra) for m, b, s, g, extra in chosen]


def label(job: dict) -> str:
    extra = []
    if job["method"] != "full":
        extra.append(f"r{job.get('r', 8)} p{job.get('dropout', 0.0)}")
        if job.get("targets", "all-linear") != "all-linear":
            extra.append(job["targets"])
    if job.get("optim", "adamw") != "adamw":
        extra.append(job["optim"])
    return f"{job['method']:<6} b{job['batch']} s{job['seq_len']:<4} {'gc' if job['gc'] else '  '} {' '.join(extra)}"


def main() -> int:
    from tuneforge.estimate.bill import estimate_memory
    from tuneforge.estimate.measure import job_setup, measure_peak
    from tuneforge.estimate.spec import model_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every third configuration only")
    parser.add_argument("--only", choices=sorted({c[0] for c in CONFIGS}), help="one method's configurations")
    parser.add_argument("--json-out", help="also write the rows to this JSON file")
    args = parser.parse_args()

    rows = []
    header = f"{'configuration':<36} {'estimate MiB':>12} {'measured MiB':>12} {'error':>7}  peak phase"
    print(header)
    print("-" * len(header))
    for job in jobs(args.quick, args.only):
        setup, config = job_setup(job)
        spec = model_spec(config, name="bench-llama")
        bill = estimate_memory(spec, setup)
        started = time.perf_counter()
        measured = measure_peak(job)
        error = bill.total_bytes / measured["peak_bytes"] - 1
        row = {"config": label(job), "job": job, "params": spec.total_params, "trainable": bill.trainable_params,
               "estimate_bytes": bill.total_bytes, "measured_bytes": measured["peak_bytes"], "error": round(error, 4),
               "peak_phase": bill.peak_phase, "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(f"{row['config']:<36} {bill.total_bytes / 2**20:>12.1f} {measured['peak_bytes'] / 2**20:>12.1f} "
              f"{100 * error:>+6.1f}%  {bill.peak_phase}", flush=True)
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"\nworst error {100 * worst['error']:+.1f}% ({worst['config'].strip()}); "
          f"{sum(abs(r['error']) <= 0.15 for r in rows)}/{len(rows)} within ±15%; model {rows[0]['params']:,} params")
    print(json.dumps({"rows": rows}))
    if args.json_out:
        from tuneforge.utils import atomic_write_json

        atomic_write_json(args.json_out, {"rows": rows})
    return 0 if all(abs(r["error"]) <= 0.15 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
