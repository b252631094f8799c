"""vLLM and SGLang as engines for the same run: the OpenAI server command a run turns into, and a parity check.

``tuneforge serve RUN... --engine vllm|sglang`` starts that engine's OpenAI-compatible server with what the run says:

- the base model and the runs' LoRA adapters as LoRA modules (``--lora-modules NAME=DIR`` / ``--lora-paths``), or a
  full model directory (a full fine-tune, or a merged model: ``tuneforge merge`` it first when the method is not
  plain LoRA, e.g. DoRA or a progressive stack);
- the run's own chat template, written to a file (``--chat-template``): the engine renders exactly what training
  rendered, not the tokenizer's default;
- its stop tokens (EOS, the template's end-of-turn) and generation defaults (``--override-generation-config`` /
  ``--preferred-sampling-params``);
- the served model names tuneforge itself uses (the run's folder name, or ``NAME=PATH``).

Without the engine installed or without a GPU it refuses with a message saying which. ``tuneforge serve RUN
--check-engine URL`` sends the same chat prompts to a running engine and to tuneforge's own decoding, greedy, and
reports how many answers agree token by token.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import UserError

ENGINES = ("vllm", "sglang")
INSTALL = {"vllm": "pip install vllm", "sglang": "pip install 'sglang[all]'"}


@dataclass(frozen=True)
class EngineLaunch:
    """The command that serves the runs with another engine.

    Attributes:
        engine: ``vllm`` or ``sglang``.
        argv: the command line (the API key is not in it: it goes through ``env``).
        env: environment variables to add (the API key).
        names: the served model names, as tuneforge serves them.
        chat_template: the template file written for the engine.
    """

    engine: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    chat_template: str | None = None

    def shell(self) -> str:
        return " ".join(shlex.quote(part) for part in self.argv)


def engine_available(engine: str) -> str | None:
    """Why ``engine`` cannot run here (not installed, no GPU), or ``None`` when it can."""
    problems = []
    if importlib.util.find_spec(engine) is None:
        problems.append(f"{engine} is not installed ({INSTALL[engine]})")
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:
        problems.append(f"no GPU is visible (torch.cuda.is_available() is False; {engine} serves on a GPU)")
    return "; ".join(problems) or None


def engine_command(engine: str, specs: list[str], *, host: str = "127.0.0.1", port: int = 8000,
                   api_key: str | None = None, workdir: str | Path, default_max_tokens: int = 256,
                   default_temperature: float = 0.0, max_lora_rank: int | None = None) -> EngineLaunch:
    """The ``engine`` OpenAI server command for ``specs`` (runs / adapter dirs / model dirs, ``NAME=PATH``).

    Args:
        engine: ``vllm`` or ``sglang``.
        specs: what ``tuneforge serve`` takes; adapters must share one base (one engine serves one base).
        host, port: where the engine listens.
        api_key: passed through the environment (``VLLM_API_KEY``; SGLang has only ``--api-key``, so it is on the
            command line there: prefer a loopback bind).
        workdir: where the chat template file is written.
        default_max_tokens, default_temperature: the generation defaults (as ``tuneforge serve``'s flags).
        max_lora_rank: the largest LoRA rank (default: read from the adapters).

    Raises:
        UserError: an unknown engine, runs on different bases, an adapter the engine cannot load as LoRA.
    """
    from tuneforge.models.reference import load_template, load_tokenizer_of, resolve
    from tuneforge.models.sampling import stop_token_ids
    from tuneforge.serve.engine import expand_per_task, served_names

    if engine not in ENGINES:
        raise UserError(f"--engine {engine!r} is not one of {', '.join(ENGINES)}")
    pairs, _ = expand_per_task(served_names(specs))
    refs = [(name, resolve(path)) for name, path in pairs]
    bases = {ref.base_key if ref.adapter is not None else ref.base for _, ref in refs}
    if len(bases) > 1:
        listing = ", ".join(f"{name}: {ref.base}" for name, ref in refs)
        raise UserError(f"--engine {engine} serves one base per server, and these runs have different bases "
                        f"({listing}); start one engine per base")
    loras: list[tuple[str, str]] = []
    ranks = []
    for name, ref in refs:
        if ref.adapter is None:
            continue
        config = ref.adapter_config or {}
        if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or ref.stack:
            raise UserError(f"{name} ({ref.given}): {engine} loads plain LoRA adapters only, and this run is "
                            f"{'a progressive stack' if ref.stack else config.get('peft_type', '?')}"
                            f"{' with DoRA' if config.get('use_dora') else ''}; merge it first (tuneforge merge "
                            f"{ref.given} --out DIR) and serve DIR --engine {engine}")
        loras.append((name, str(ref.adapter)))
        ranks.append(int(config.get("r", 8)))
    full = [(name, ref) for name, ref in refs if ref.adapter is None]
    if full and loras:
        raise UserError(f"--engine {engine}: serve adapters of a base, or one full model, not both "
                        f"({full[0][0]} is a full model)")
    if len(full) > 1:
        raise UserError(f"--engine {engine} serves one model; {', '.join(n for n, _ in full)} are each full models")
    first_name, first = refs[0]
    model_path = str(first.base)
    tokenizer = load_tokenizer_of(first)
    template = load_template(first.template_dir, tokenizer)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    template_file = None
    if template is not None:
        template_file = workdir / "chat_template.jinja"
        template_file.write_text(template.jinja, encoding="utf-8")
    stops = stop_token_ids(tokenizer, template)
    names = [name for name, _ in refs]
    served_base = names[0] if not loras else f"{Path(model_path).name}-base"
    env: dict[str, str] = {}
    if engine == "vllm":
        argv = ["vllm", "serve", model_path, "--host", host, "--port", str(port),
                "--served-model-name", served_base, "--tokenizer", str(first.tokenizer or model_path),
                "--generation-config", "vllm",
                "--override-generation-config", json.dumps({"eos_token_id": stops, "temperature": default_temperature,
                                                            "max_new_tokens": default_max_tokens})]
        if loras:
            argv += ["--enable-lora", "--max-lora-rank", str(max_lora_rank or max(ranks)), "--max-loras",
                     str(len(loras)), "--lora-modules", *(f"{name}={path}" for name, path in loras)]
        if template_file is not None:
            argv += ["--chat-template", str(template_file)]
        if api_key:
            env["VLLM_API_KEY"] = api_key
    else:
        argv = ["python", "-m", "sglang.launch_server", "--model-path", model_path, "--host", host, "--port",
                str(port), "--served-model-name", served_base, "--tokenizer-path", str(first.tokenizer or model_path),
                "--preferred-sampling-params", json.dumps({"stop_token_ids": stops, "temperature": default_temperature,
                                                           "max_new_tokens": default_max_tokens})]
        if loras:
            argv += ["--enable-lora", "--max-lora-rank", str(max_lora_rank or max(ranks)), "--max-loras-per-batch",
                     str(len(loras)), "--lora-paths", *(f"{name}={path}" for name, path in loras)]
        if template_file is not None:
            argv += ["--chat-template", str(template_file)]
        if api_key:
            argv += ["--api-key", api_key]
    return EngineLaunch(engine, argv, env, names, str(template_file) if template_file else None)


# --------------------------------------------------------------------------- parity check

DEFAULT_CHECK_PROMPTS = ("What is a list in Python?", "Write one sentence about the sea.",
                         "What does the for statement do?", "Name three colours.")


@dataclass(frozen=True)
class Agreement:
    """Greedy answers of one prompt from both engines, as token ids of the run's tokenizer."""

    model: str
    prompt: str
    ours: list[int]
    theirs: list[int]

    @property
    def common(self) -> int:
        n = 0
        for a, b in zip(self.ours, self.theirs, strict=False):
            if a != b:
                break
            n += 1
        return n

    @property
    def identical(self) -> bool:
        return self.ours == self.theirs


def check_engine(url: str, specs: list[str], *, prompts: list[str] | None = None, max_tokens: int = 32,
                 api_key: str | None = None, device: str = "auto", timeout: float = 120) -> list[Agreement]:
    """Send ``prompts`` (as one user message each) to the engine at ``url`` and to tuneforge's decoding of the same
    runs, greedy, ``max_tokens`` each; the answers as token ids of each run's tokenizer (the engine's text
    re-tokenised).

    Raises:
        UserError: the engine cannot be reached or answers with an error.
    """
    import httpx

    from tuneforge.models.generation import GenerationSettings, complete
    from tuneforge.serve.engine import Engine

    prompts = list(prompts or DEFAULT_CHECK_PROMPTS)
    engine = Engine(specs, device=device, max_batch_size=8)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[Agreement] = []
    try:
        for name, served in engine.models.items():
            served.activate()
            settings = GenerationSettings(max_new_tokens=max_tokens)
            messages = [[{"role": "user", "content": p}] for p in prompts]
            ours = complete(served.model, served.tokenizer, served.template, messages, settings)
            for prompt, mine in zip(prompts, ours, strict=True):
                body = {"model": name, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                        "max_tokens": max_tokens}
                try:
                    response = httpx.post(url.rstrip("/") + "/v1/chat/completions", json=body, headers=headers,
                                          timeout=timeout)
                except httpx.HTTPError as exc:
                    raise UserError(f"--check-engine {url}: cannot reach the engine ({exc})") from None
                if response.status_code != 200:
                    raise UserError(f"--check-engine {url}: the engine answered {response.status_code} for model "
                                    f"{name!r}: {response.text[:300]}")
                text = response.json()["choices"][0]["message"]["content"] or ""
                theirs = served.tokenizer(text, add_special_tokens=False)["input_ids"]
                # both answers as the run's tokenizer splits their text (a generated split need not be canonical)
                mine_ids = served.tokenizer(mine.text, add_special_tokens=False)["input_ids"]
                results.append(Agreement(name, prompt, list(mine_ids), list(theirs)))
    finally:
        engine.scheduler.close()
    return results


def agreement_report(results: list[Agreement]) -> str:
    """A table of per-prompt agreement and the totals."""
    lines = ["| model | prompt | tuneforge tokens | engine tokens | agree (common prefix) |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.model} | {r.prompt[:40]} | {len(r.ours)} | {len(r.theirs)} | "
                     f"{'identical' if r.identical else r.common} |")
    total = sum(max(len(r.ours), len(r.theirs)) for r in results)
    common = sum(r.common for r in results)
    same = sum(r.identical for r in results)
    lines.append(f"\n{same}/{len(results)} answers identical; {common}/{total} tokens agree "
                 f"({100 * common / max(total, 1):.1f}%)")
    return "\n".join(lines)


def launch(launch: EngineLaunch) -> int:  # pragma: no cover - needs a GPU and the engine
    """Run the engine's server in the foreground; its exit code."""
    import os
    import subprocess

    return subprocess.call(launch.argv, env={**os.environ, **launch.env})


def describe(launch: EngineLaunch) -> str:
    env = "".join(f"{k}=*** " for k in launch.env)
    return f"{env}{launch.shell()}"
