"""Load test of ``tuneforge serve``: continuous vs dynamic batching on the same model, in the same run.

Both arms serve the same base and two LoRA adapters of it (``a``, ``b``) with the real command (``tuneforge serve``,
a subprocess bound to 127.0.0.1), differing only in ``--batching continuous|dynamic``; the arms alternate over
``--rounds`` (other processes share the machine) and the table shows each arm's median round. Requests stream
(``/v1/completions``, greedy), so time to first token (TTFT) and per-token latency are measured on the client
(``--stream-share`` < 1 streams only that share of the closed-loop requests: the client shares the CPU).

Workloads per arm:

- **long + short**: two 256-token generations run; meanwhile 4-token requests are sent one after another; their
  latency is compared with the same request on the idle server (target: within 4x);
- **closed loop at 8 / 32 / 64 clients**, a mixed workload: one request in five asks for 128 tokens, the others for
  16; adapter ``a`` only (target: requests/s at 32 clients >= 3x at 8);
- **mixed adapters at 32 clients**: the same load, each request for ``a`` or ``b`` at random (target: >= 0.8x the
  single-adapter throughput);
- **greedy identity**: the answers given under load equal the answers each prompt gets alone.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_load.py [--seconds 15] [--rounds 1]
    # the parent commit's code as a third arm, side by side:
    git archive HEAD~1 src | tar -x -C /tmp/base && ... serve_load.py --baseline-src /tmp/base/src
    # the target's model (scripts/fetch_real_model.sh), 8 vs 32 clients only:
    ... serve_load.py --model ~/.cache/tuneforge/real/SmolLM2-135M-Instruct.Q4_1.gguf --seconds 60 \
        --clients 8,32 --arms continuous --scaling-only

Each continuous arm is also timed in-process first (``--step-timings 8,32``): milliseconds per decoding step at 8
and 32 rows, split into the cache layers' updates (``DynamicCache``'s concatenation, or the KV store's in-place
write), the rest of the forward pass and the rest of the step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A small Llama (≈6M parameters): big enough that a forward pass is real work, small enough for 2 shared cores.
MODEL = {"architecture": "llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "vocab_size": 2048,
         "max_position_embeddings": 512}
ARMS = ("continuous", "dynamic")
CLIENTS = (8, 32, 64)
MAX_BATCH = 64


def build_models(folder: Path, model: str | None = None) -> list[str]:
    """Save a base, two LoRA adapters of it (``a``, ``b``) with tokenizer and template; return prompts.

    The base is a from-config Llama (``MODEL``) or, with ``model`` (a GGUF file or an HF model directory), that
    pretrained model (a GGUF file is converted once to a cached HF directory by ``models.gguf``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.config.schema import FromConfig
    from tuneforge.data.builtin import pydoc_topics
    from tuneforge.data.templates import get_template
    from tuneforge.models import build_model as build
    from tuneforge.models import train_tokenizer

    texts = [p.strip() for text in pydoc_topics().values() for p in text.split("\n\n") if len(p.strip()) > 40]
    if model is None:
        tokenizer = train_tokenizer(texts[:2000], vocab_size=MODEL["vocab_size"])
        torch.manual_seed(0)
        built = build(FromConfig(**MODEL), tokenizer)
        base = folder / "base"
        built.save_pretrained(base)
        tokenizer.save_pretrained(base)
        get_template("chatml").save(base)
    else:
        from transformers import AutoTokenizer

        from tuneforge.models.gguf import gguf_path_of, materialize

        gguf = gguf_path_of(model)
        base = materialize(gguf) if gguf is not None else Path(model)
        tokenizer = AutoTokenizer.from_pretrained(base)
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False, lora_dropout=0.0)
        adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
        adapter.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        get_template("chatml").save(folder / name)
    sentences = [s.strip() for text in texts for s in text.replace("\n", " ").split(". ") if 20 < len(s) < 160]
    return sentences[:500]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def arm_env(src: str | None) -> dict:
    """The environment of an arm's processes: one torch thread unless told otherwise, and ``src`` (another checkout's
    ``src`` directory, e.g. the parent commit's) first on the import path when given."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start_server(folder: Path, batching: str, src: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = arm_env(src)
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli", "serve", f"a={folder / 'a'}", f"b={folder / 'b'}", "--host",
         "127.0.0.1", "--port", str(port), "--device", "cpu", "--batching", batching, "--max-batch-size",
         str(MAX_BATCH), "--max-queue", "512", "--max-tokens-limit", "512"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.terminate()
    raise RuntimeError("the server did not start within 180 s")


async def one(http, url: str, model: str, prompt: str, max_tokens: int, stream: bool = True) -> dict:
    """One greedy completion: latency, tokens, text; streamed: also TTFT and per-token latency."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    sent = time.monotonic()
    if not stream:
        response = await http.post(url + "/v1/completions", json=body, timeout=300)
        if response.status_code != 200:
            return {"ok": False}
        data = response.json()
        return {"ok": True, "latency": time.monotonic() - sent, "tokens": data["usage"]["completion_tokens"],
                "text": data["choices"][0]["text"], "streamed": False}
    body["stream_options"] = {"include_usage": True}
    first = None
    text, tokens = [], 0
    async with http.stream("POST", url + "/v1/completions", json=body, timeout=300) as response:
        if response.status_code != 200:
            await response.aread()
            return {"ok": False}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return {"ok": False}
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            for choice in data.get("choices", ()):
                if choice.get("text"):
                    first = first or time.monotonic()
                    text.append(choice["text"])
    end = time.monotonic()
    first = first or end
    return {"ok": True, "latency": end - sent, "ttft": first - sent, "tokens": tokens, "text": "".join(text),
            "per_token": (end - first) / max(1, tokens - 1), "streamed": True}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def closed_loop(url: str, prompts: list[str], clients: int, seconds: float, models: tuple[str, ...],
                      seed: int = 0, stream_share: float = 1.0) -> dict:
    """``clients`` clients sending back to back for ``seconds``: one request in five asks for 128 tokens; a share
    ``stream_share`` of them streams (TTFT and per-token latency are measured on those)."""
    import httpx

    rng = random.Random(seed)
    done: list[dict] = []
    failures = 0
    end = time.monotonic() + seconds
    started = time.monotonic()

    async def client(http):
        nonlocal failures
        while time.monotonic() < end:
            budget = 128 if rng.random() < 0.2 else 16
            stream = rng.random() < stream_share
            result = await one(http, url, rng.choice(models), rng.choice(prompts), budget, stream)
            if result["ok"]:
                done.append(result)
            else:
                failures += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.monotonic() - started
    streamed = [r for r in done if r["streamed"]]
    return {"clients": clients, "requests": len(done), "failures": failures, "rps": len(done) / elapsed,
            "tps": sum(r["tokens"] for r in done) / elapsed,
            "ttft_p50": quantile([r["ttft"] for r in streamed], 0.5),
            "ttft_p99": quantile([r["ttft"] for r in streamed], 0.99),
            "tok_p50": quantile([r["per_token"] for r in streamed], 0.5),
            "tok_p99": quantile([r["per_token"] for r in streamed], 0.99)}


async def long_and_short(url: str, prompts: list[str], shorts: int = 6) -> dict:
    """4-token requests alone, then while two 256-token generations run."""
    import httpx

    async with httpx.AsyncClient() as http:
        alone = [(await one(http, url, "a", prompts[i], 4))["latency"] for i in range(shorts)]
        longs = [asyncio.ensure_future(one(http, url, "a", prompts[100 + i], 256)) for i in range(2)]
        await asyncio.sleep(0.5)
        beside = []
        for i in range(shorts):
            if all(task.done() for task in longs):
                break
            beside.append((await one(http, url, "a", prompts[i], 4))["latency"])
        long_results = await asyncio.gather(*longs)
    return {"alone": statistics.median(alone), "beside": statistics.median(beside) if beside else float("nan"),
            "long_seconds": max(r["latency"] for r in long_results), "long_tokens": [r["tokens"] for r in long_results]}


async def answers(url: str, prompts: list[str], concurrent: bool) -> list[str]:
    """Greedy 24-token answers of ``prompts`` (alternating adapters), one at a time or all at once."""
    import httpx

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as http:
        calls = [one(http, url, "ab"[i % 2], p, 24) for i, p in enumerate(prompts)]
        if concurrent:
            results = await asyncio.gather(*calls)
        else:
            results = [await call for call in calls]
    return [r.get("text") for r in results]


def run_arm(folder: Path, batching: str, prompts: list[str], seconds: float, stream_share: float = 1.0, *,
            src: str | None = None, clients: tuple[int, ...] = CLIENTS, scaling_only: bool = False) -> dict:
    process, url = start_server(folder, batching, src)
    try:
        asyncio.run(closed_loop(url, prompts, 4, 3.0, ("a", "b")))  # warm-up
        out: dict = {}
        if not scaling_only:
            out["long_short"] = asyncio.run(long_and_short(url, prompts))
        out["load"] = [asyncio.run(closed_loop(url, prompts, c, seconds, ("a",), stream_share=stream_share))
                       for c in clients]
        if not scaling_only:
            out["mixed"] = asyncio.run(closed_loop(url, prompts, 32, seconds, ("a", "b"), seed=1,
                                                   stream_share=stream_share))
            sample = prompts[200:216]
            out["greedy_identical"] = (asyncio.run(answers(url, sample, True))
                                       == asyncio.run(answers(url, sample, False)))
    finally:
        process.terminate()
        process.wait(timeout=30)
    return out


def step_timings(folder: Path, rows: int, steps: int) -> dict:
    """In this process: the served adapter ``a`` (as ``tuneforge serve`` loads it) decoding ``rows`` rows in one
    continuous batch; milliseconds per decoding step, split into the cache writes/copies (the cache layers'
    ``update``), the rest of the forward pass, and the rest of the step (token choice, text, events)."""
    import time as clock

    from tuneforge.models.decoding import DecodeRow, Joining
    from tuneforge.models.sampling import GenerationSettings
    from tuneforge.serve.engine import Engine
    from tuneforge.serve.scheduler import _pool_for

    engine = Engine([f"a={folder / 'a'}", f"b={folder / 'b'}"], device="cpu", max_batch_size=rows)
    served = engine.get("a")
    pool = _pool_for(served)
    text = "The for statement is used to iterate over the elements of a sequence such as a string"
    prompt = served.prompt_ids(text)
    pool.add([Joining(DecodeRow(prompt[:12 + i % 9], GenerationSettings(max_new_tokens=10_000),
                                on_event=lambda event: None), served.tokenizer, None, served.adapter_name, i)
              for i in range(rows)])
    spent = {"cache": 0.0, "forward": 0.0}
    forward = pool._forward

    def timed_forward(*args, **kwargs):
        for layer in pool.cache.layers:
            if not getattr(layer, "_timed", False):
                update = layer.update

                def timed_update(*a, _update=update, **k):
                    began = clock.perf_counter()
                    try:
                        return _update(*a, **k)
                    finally:
                        spent["cache"] += clock.perf_counter() - began
                layer.update, layer._timed = timed_update, True
        began = clock.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            spent["forward"] += clock.perf_counter() - began

    pool._forward = timed_forward
    for _ in range(16):  # warm-up: caches ~30 columns wide
        pool.step()
    spent.update(cache=0.0, forward=0.0)
    began = clock.perf_counter()
    for _ in range(steps):
        pool.step()
    total = (clock.perf_counter() - began) / steps
    cache, forward_only = spent["cache"] / steps, (spent["forward"] - spent["cache"]) / steps
    return {"rows": rows, "step_ms": 1000 * total, "cache_ms": 1000 * cache, "forward_ms": 1000 * forward_only,
            "rest_ms": 1000 * (total - spent["forward"] / steps), "tokens_per_s": rows / total}


def run_step_timings(folder: Path, src: str | None, rows: tuple[int, ...], steps: int) -> list[dict]:
    """:func:`step_timings` in a subprocess with the arm's import path (the parent commit's code, or this one)."""
    out = []
    for count in rows:
        done = subprocess.run([sys.executable, __file__, "--_step-timings", str(folder), str(count), str(steps)],
                              env=arm_env(src), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"step timings failed:\n{done.stderr[-3000:]}")
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each load point (bounded: <= 120)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per arm (bounded: <= 3)")
    parser.add_argument("--stream-share", type=float, default=1.0,
                        help="share of the closed-loop requests that stream (the latency percentiles come from "
                        "them; the others are plain requests, cheaper for a client on the same machine)")
    parser.add_argument("--model", default=None,
                        help="base model: a GGUF file (e.g. ~/.cache/tuneforge/real/SmolLM2-135M-Instruct.Q4_1.gguf, "
                        "scripts/fetch_real_model.sh) or an HF model directory; default: a from-config 6M Llama")
    parser.add_argument("--clients", default=",".join(map(str, CLIENTS)), help="closed-loop client counts")
    parser.add_argument("--arms", default=",".join(ARMS), help="batching arms of this checkout")
    parser.add_argument("--baseline-src", default=None,
                        help="another checkout's src directory (e.g. `git archive PARENT src | tar -x -C DIR`): adds "
                        "an arm 'continuous@baseline' running that code, side by side in the same run")
    parser.add_argument("--scaling-only", action="store_true",
                        help="only the closed loops of adapter a (no long+short, mixed-adapter or greedy workloads)")
    parser.add_argument("--step-timings", default="8,32",
                        help="rows at which to time decoding steps in-process per continuous arm ('' = none)")
    parser.add_argument("--steps", type=int, default=32, help="decoding steps timed per row count")
    args = parser.parse_args()
    seconds = min(args.seconds, 120.0)
    clients = tuple(int(c) for c in args.clients.split(","))
    arms = [(arm, arm, None) for arm in args.arms.split(",") if arm]
    if args.baseline_src:
        arms.append(("continuous@baseline", "continuous", args.baseline_src))
    timing_rows = tuple(int(r) for r in args.step_timings.split(",") if r)
    rounds: dict[str, list[dict]] = {label: [] for label, _, _ in arms}
    timings: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompts = build_models(folder, args.model)
        for label, batching, src in arms:
            if batching == "continuous" and timing_rows:
                timings[label] = run_step_timings(folder, src, timing_rows, args.steps)
                print(f"step timings {label}: {json.dumps(timings[label])}", file=sys.stderr, flush=True)
        for index in range(max(1, min(args.rounds, 3))):
            for label, batching, src in (arms if index % 2 == 0 else arms[::-1]):
                rounds[label].append(run_arm(folder, batching, prompts, seconds, args.stream_share, src=src,
                                             clients=clients, scaling_only=args.scaling_only))
                print(f"round {index + 1} {label}: {json.dumps(rounds[label][-1])}", file=sys.stderr, flush=True)
    at32 = clients.index(32) if 32 in clients else len(clients) - 1
    results = {label: sorted(runs, key=lambda r: r["load"][at32]["rps"])[(len(runs) - 1) // 2]
               for label, runs in rounds.items()}
    described = (f"{args.model} + two LoRA adapters (r 8)" if args.model else
                 f"{MODEL['hidden_size']}x{MODEL['num_layers']} Llama (vocab {MODEL['vocab_size']}) + two LoRA "
                 "adapters (r 8)")
    print(f"\n`tuneforge serve`, {described}, --max-batch-size {MAX_BATCH}, streamed greedy /v1/completions, "
          f"{seconds:.0f} s per load point, {100 * args.stream_share:.0f}% of the closed-loop requests streamed, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}; median of {args.rounds} round(s); "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    if timings:
        print("| arm | rows | ms / decoding step | cache update ms | rest of forward ms | rest of step ms | "
              "tokens/s |")
        print("|---|---|---|---|---|---|---|")
        for label, points in timings.items():
            for t in points:
                print(f"| {label} | {t['rows']} | {t['step_ms']:.1f} | {t['cache_ms']:.1f} | {t['forward_ms']:.1f} | "
                      f"{t['rest_ms']:.1f} | {t['tokens_per_s']:.0f} |")
        print()
    print("| arm | workload | clients | requests | req/s | tokens/s | TTFT p50 / p99 s | per-token p50 / p99 ms |"
          " failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in results:
        r = results[label]
        points = [("mixed lengths, adapter a", p) for p in r["load"]]
        if "mixed" in r:
            points.append(("mixed lengths, adapters a+b", r["mixed"]))
        for name, point in points:
            print(f"| {label} | {name} | {point['clients']} | {point['requests']} | {point['rps']:.2f} | "
                  f"{point['tps']:.0f} | {point['ttft_p50']:.2f} / {point['ttft_p99']:.2f} | "
                  f"{1000 * point['tok_p50']:.0f} / {1000 * point['tok_p99']:.0f} | {point['failures']} |")
    at8 = clients.index(8) if 8 in clients else 0
    print("\n| arm | 4-token request alone s | beside two 256-token generations s | ratio (target <= 4) | "
          f"rps {clients[at32]} / rps {clients[at8]} (target >= 3 for 32 / 8) | "
          "mixed / single adapter at 32 (target >= 0.8) | greedy under load = alone |")
    print("|---|---|---|---|---|---|---|")
    for label in results:
        r = results[label]
        scale = r["load"][at32]["rps"] / max(r["load"][at8]["rps"], 1e-9)
        if "long_short" in r:
            ls = r["long_short"]
            mixed = r["mixed"]["rps"] / max(r["load"][at32]["rps"], 1e-9)
            print(f"| {label} | {ls['alone']:.2f} | {ls['beside']:.2f} | {ls['beside'] / ls['alone']:.1f}x | "
                  f"{scale:.2f}x | {mixed:.2f}x | {r['greedy_identical']} |")
        else:
            print(f"| {label} | - | - | - | {scale:.2f}x | - | - |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--_step-timings":  # run_step_timings' subprocess
        print(json.dumps(step_timings(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
        raise SystemExit(0)
    raise SystemExit(main())
