"""``tuneforge quickstart``: the whole pipeline, offline, in a few minutes on two CPU cores.

1. Write the built-in data (Python's own documentation and docstrings) and two run configs into ``<out>/``.
2. Pretrain a small Llama-style model from scratch (its tokenizer trained on the same text): stage ``pt``.
3. LoRA-fine-tune it to answer "which standard-library module defines X?": stage ``sft``, answer-only loss.
4. Evaluate base vs tuned on held-out objects with ``tuneforge eval``'s code (exact match, answer perplexity),
   print the scores, the majority-class baseline and base vs tuned sample answers.

The runs are ordinary run directories: ``tuneforge generate <out>/sft --prompt ...`` works on the result, and
``tuneforge report <out>/sft`` shows the evaluation saved there.

Nothing a user made is replaced: ``<out>`` must be new, empty, or an earlier quickstart's (it leaves the marker
``<out>/.tuneforge-quickstart.json`` listing the files it wrote with their SHA-256 and the runs it trained); with
``force`` it may also be another non-empty directory. Either way a file or run the quickstart did not make itself (or
one changed since) is never replaced: the command stops before any work (:func:`check_out`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import yaml

from tuneforge.data import builtin
from tuneforge.errors import UserError
from tuneforge.models.reference import RUN_FINAL
from tuneforge.utils import atomic_write_json, atomic_write_text

HELDOUT_PER_MODULE = 20  # 8 modules → 160 held-out items, majority class 12.5%
EVAL_PER_MODULE = 5
TRAIN_PER_MODULE = 150
PRETRAIN_STEPS = 300
SFT_STEPS = 150
SAMPLES_SHOWN = 8
METRICS = ("exact", "ppl")
MARKER = ".tuneforge-quickstart.json"
RUN_NAMES = {"pretrain": "quickstart-pretrain", "sft": "quickstart-sft"}  # <out>/<run> → its run_name
FILES = ("data/pretrain.jsonl", "data/sft_train.jsonl", "data/sft_eval.jsonl", "data/heldout.jsonl",
         "configs/pretrain.yaml", "configs/sft.yaml", "results.json")


def quickstart_configs(out: Path, pretrain_steps: int, sft_steps: int, small: bool) -> tuple[dict, dict]:
    """The two run configs (as plain dicts, written to YAML so users can read and rerun them)."""
    data = out / "data"
    width, layers, vocab = (64, 2, 1024) if small else (256, 4, 4096)
    pretrain = {
        "run_name": "quickstart-pretrain",
        "output_dir": str(out / "pretrain"),
        "seed": 42,
        "stage": "pt",
        "model": {
            "from_config": {"architecture": "llama", "hidden_size": width, "num_layers": layers, "num_heads": 4,
                            "vocab_size": vocab, "max_position_embeddings": 512,
                            # untied, so that the SFT adapter may target the output layer and still merge
                            "tie_word_embeddings": False},
            # The base never sees chat markers in pretraining, so their embeddings stay random; the plain template
            # ends answers with EOS, which pretraining did teach (documents are joined with it).
            "chat_template": "plain",
        },
        "method": {"name": "full"},
        "data": {"train": [str(data / "pretrain.jsonl")], "max_length": 128 if small else 256, "packing": False},
        "train": {"max_steps": pretrain_steps, "batch_size": 8, "lr": 3.0e-3, "warmup_steps": 10,
                  "scheduler": "cosine", "weight_decay": 0.01, "logging_steps": 10, "report_to": ["tensorboard"]},
    }
    sft = {
        "run_name": "quickstart-sft",
        "output_dir": str(out / "sft"),
        "seed": 42,
        "stage": "sft",
        "model": {"name_or_path": str(out / "pretrain" / RUN_FINAL), "chat_template": "auto"},
        # All linear layers, the output layer and the input embeddings. Measured on this task (8 modules, 150
        # steps, same base): without the embeddings the adapter learns little more than the label prior (held-out
        # exact 8.8%, majority 12.5%) — the cue words' embeddings must move; with them 73%. The output layer is
        # untied from the embeddings, so the adapter merges.
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                      "lm_head", "embed_tokens"]},
        "data": {"train": [str(data / "sft_train.jsonl")], "eval": str(data / "sft_eval.jsonl"),
                 "max_length": 256, "packing": True},
        "train": {"max_steps": sft_steps, "batch_size": 8, "lr": 2.0e-3, "warmup_steps": 5,
                  "scheduler": "cosine", "logging_steps": 10, "eval_steps": max(sft_steps // 2, 1),
                  "report_to": ["tensorboard"]},
    }
    return pretrain, sft


def write_data(out: Path) -> list[dict]:
    """Write the built-in corpora; return the held-out test items."""
    data = out / "data"
    task = builtin.module_task(HELDOUT_PER_MODULE, EVAL_PER_MODULE, TRAIN_PER_MODULE, seed=0)
    docs = builtin.pretrain_documents(task)
    atomic_write_text(data / "pretrain.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    for name, items in (("sft_train", task.train), ("sft_eval", task.eval), ("heldout", task.test)):
        lines = "".join(json.dumps({"messages": i["messages"]}, ensure_ascii=False) + "\n" for i in items)
        atomic_write_text(data / f"{name}.jsonl", lines)
    return task.test


def check_out(out: Path, force: bool = False) -> None:
    """Refuse an ``out`` where the quickstart would replace something it did not make; writes nothing.

    Raises:
        UserError: ``out`` is a file; a non-empty directory without the quickstart's marker (unless ``force``);
            or one of the quickstart's paths (:data:`FILES`, the runs of :data:`RUN_NAMES`) exists and was not made
            by an earlier quickstart (a file not in the marker or changed since, a run with another ``run_name``).
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a new or empty directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    marker = _read_marker(out)
    if marker is None and not force:
        raise UserError(f"--out {out} is a non-empty directory that no earlier quickstart made (no {MARKER} in it); "
                        "choose a new or empty directory, or pass --force to write the quickstart beside what is "
                        "there (it still never replaces a file or run it did not make)")
    marker = marker or {}
    made = marker.get("files", {})
    foreign = [rel for rel in FILES if (out / rel).exists() and made.get(rel) != _sha256(out / rel)]
    foreign += [f"{run}/" for run in RUN_NAMES if not _ours(out / run, run, marker)]
    if foreign:
        raise UserError(f"--out {out}: {', '.join(foreign)} {'was' if len(foreign) == 1 else 'were'} not made by "
                        "an earlier tuneforge quickstart (or changed since), and the quickstart never replaces "
                        "them; choose another --out, or move them away")


def _ours(run_dir: Path, run: str, marker: dict) -> bool:
    """An absent or empty run directory, or a run the marker lists whose config names the quickstart's run."""
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return True
    if run not in marker.get("runs", []) or not run_dir.is_dir():
        return False
    from tuneforge.models.reference import RUN_CONFIG

    config = run_dir / RUN_CONFIG
    if not config.is_file():
        return True  # a run of ours stopped before it wrote its config (training replaces it)
    try:
        saved = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and saved.get("run_name") == RUN_NAMES[run]


def _read_marker(out: Path) -> dict | None:
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _write_marker(out: Path) -> None:
    """Record what the quickstart made: every file of :data:`FILES` present now (with its hash) and the runs."""
    files = {rel: _sha256(out / rel) for rel in FILES if (out / rel).is_file()}
    atomic_write_json(out / MARKER, {"tuneforge_quickstart": 1, "files": files, "runs": list(RUN_NAMES)})


def run_quickstart(out: str | Path = "runs/quickstart", pretrain_steps: int | None = None,
                   sft_steps: int | None = None, small: bool = False, force: bool = False) -> dict:
    """Run the whole offline demo; return ``{"base": scores, "tuned": scores, ...}`` (also saved as results.json).

    Scores are ``tuneforge eval`` rows (``exact`` in percent, ``ppl``, ``tokens``, ``predictions``);
    ``majority_class_exact`` is the percentage of held-out items whose answer is the most frequent one.

    Args:
        force: write into a non-empty ``out`` that no earlier quickstart made (still never replacing anything
            the quickstart did not make).

    Raises:
        UserError: from :func:`check_out`, before anything is written.
    """
    from tuneforge.config import validate_config
    from tuneforge.train import train

    out = Path(out)
    check_out(out, force)  # before any work: nothing of the user's is replaced
    started = time.time()
    pretrain_steps = pretrain_steps or (40 if small else PRETRAIN_STEPS)
    sft_steps = sft_steps or (30 if small else SFT_STEPS)
    test = write_data(out)
    raw_pt, raw_sft = quickstart_configs(out, pretrain_steps, sft_steps, small)
    for name, raw in (("pretrain", raw_pt), ("sft", raw_sft)):
        atomic_write_text(out / "configs" / f"{name}.yaml", yaml.safe_dump(raw, sort_keys=False))
    _write_marker(out)  # before training: an interrupted quickstart may be run again over its own files

    _stage("1/3 pretraining a small Llama-style model on the Python documentation (stage pt, full)")
    train(validate_config(raw_pt, "quickstart pretrain"), overwrite=True)
    _stage("2/3 LoRA fine-tuning: which standard-library module defines this? (stage sft, answer-only loss)")
    train(validate_config(raw_sft, "quickstart sft"), overwrite=True)
    _stage(f"3/3 evaluating base vs tuned on {len(test)} held-out objects (tuneforge eval: exact, ppl)")
    base, tuned = evaluate_runs([out / "pretrain", out / "sft"], out / "data" / "heldout.jsonl", test)
    gold = [item["messages"][-1]["content"] for item in test]
    result = {
        "base": base,
        "tuned": tuned,
        "majority_class_exact": 100.0 * Counter(gold).most_common(1)[0][1] / len(gold),
        "heldout_items": len(test),
        "steps": {"pretrain": pretrain_steps, "sft": sft_steps},
        "seconds": round(time.time() - started, 1),
    }
    atomic_write_json(out / "results.json", result)
    _write_marker(out)
    _print_results(result, test, out)
    return result


def evaluate_runs(runs: list[Path], data: Path, records: list[dict]) -> list[dict]:
    """``tuneforge eval``'s rows for ``runs`` on ``records`` (greedy, predictions kept), saved in each run dir."""
    from tuneforge.evaluate.runner import as_metrics, evaluate_model, save_to_run_dirs
    from tuneforge.models.generation import GenerationSettings

    metrics = as_metrics(list(METRICS))
    settings = GenerationSettings(max_new_tokens=4)  # every answer is one module name
    rows = [evaluate_model(str(run), records, metrics, settings, device="cpu", keep_predictions=True)
            for run in runs]
    save_to_run_dirs(rows, str(data), metrics, settings)
    return rows


def _stage(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _print_results(result: dict, test: list[dict], out: Path) -> None:
    from rich.table import Table

    from tuneforge.console import out as console_out

    console = console_out()
    table = Table(title=f"quickstart: {result['heldout_items']} held-out objects, answer-only metrics")
    for column in ("model", "exact match", "perplexity", "answer tokens"):
        table.add_column(column)
    for name in ("base", "tuned"):
        scores = result[name]
        table.add_row(name, f"{scores['exact']:.1f}%", f"{scores['ppl']:.2f}", f"{scores['tokens']:,}")
    console.print(table)
    console.print(_samples_table(result, test))
    majority = result["majority_class_exact"]
    tuned = result["tuned"]["exact"]
    console.print(f"majority-class baseline: {majority:.1f}%; tuned − majority: {tuned - majority:+.1f} points; "
                  f"tuned − base: {tuned - result['base']['exact']:+.1f} points; "
                  f"{result['steps']['pretrain']} + {result['steps']['sft']} steps in {result['seconds']:.0f} s")
    example = builtin.QUESTION.format(name="Condition.notify_all")
    console.print(f"try: tuneforge generate {out / 'sft'} --prompt \"Wake up all waiting threads.\\n\\n{example}\"")


def _samples_table(result: dict, test: list[dict]):
    """Base vs tuned answers on the first ``SAMPLES_SHOWN`` held-out items (shuffled, so a fair sample)."""
    from rich.table import Table

    rows = []
    for index, item in enumerate(test[:SAMPLES_SHOWN]):
        sentence = item["messages"][0]["content"].split("\n\n")[0]
        base, tuned = (" ".join(result[name]["predictions"][index].split()) for name in ("base", "tuned"))
        rows.append((f"{item['name']}: {sentence}", item["label"], base, tuned))
    right = sum(tuned == expected for _, expected, _, tuned in rows)
    table = Table(title="held-out samples: base vs tuned answers",
                  caption=f"tuned right on {right} of these {len(rows)}")
    for column in ("prompt (object: docstring sentence)", "expected", "base", "tuned"):
        table.add_column(column, overflow="fold")
    for prompt, expected, base, tuned in rows:
        mark = "green" if tuned == expected else "red"
        table.add_row(_clip(prompt, 72), expected, _clip(base, 12) or "(empty)", f"[{mark}]{tuned or '(empty)'}[/]")
    return table


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
