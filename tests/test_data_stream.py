"""Streaming pretraining data (data/stream.py): the prepared pipeline's blocks, shuffled in seeded windows, cycling
over the corpus, and resuming exactly where a checkpoint left it — also through a real Trainer."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuneforge.config.schema import DataConfig
from tuneforge.data.build import build_datasets, build_in_memory
from tuneforge.data.stream import STATE_FILE, Position, StreamingBlocks, StreamStateCallback, build_streaming
from tuneforge.errors import UserError


@pytest.fixture()
def corpus(tmp_path):
    from tests.helpers import stdlib_texts

    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n\n".join(stdlib_texts(60)), encoding="utf-8")
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_texts(30)[::-1]), encoding="utf-8")
    return [str(txt), str(jsonl)]


def stream_cfg(files, **kw):
    return DataConfig(**{"train": files, "max_length": 32, "streaming": True, "clean": {"dedup": False}, **kw})


def take(dataset, n):
    return [r["input_ids"] for r in itertools.islice(iter(dataset), n)]


def test_blocks_are_the_prepared_pipelines_and_the_stream_cycles(corpus, tiny_tokenizer):
    cfg = stream_cfg(corpus, shuffle_buffer=1)  # a window of one row: the stream's own order
    ref = [r["input_ids"] for r in build_in_memory(cfg, "pt", tiny_tokenizer, None, 0).train]
    bundle = build_datasets(cfg, "pt", tiny_tokenizer, None, 0)
    assert isinstance(bundle.train, StreamingBlocks) and bundle.stats["streaming"]
    got = take(bundle.train, 2 * len(ref) + 3)
    assert got[: len(ref)] == ref and got[len(ref): 2 * len(ref)] == ref  # the next pass reads the corpus again
    assert all(len(ids) == 32 for ids in got)


def test_windows_are_seeded_permutations(corpus, tiny_tokenizer):
    plain = take(build_streaming(stream_cfg(corpus, shuffle_buffer=1), "pt", tiny_tokenizer, None, 0).train, 70)
    shuffled = take(build_streaming(stream_cfg(corpus, shuffle_buffer=10), "pt", tiny_tokenizer, None, 0).train, 70)
    again = take(build_streaming(stream_cfg(corpus, shuffle_buffer=10), "pt", tiny_tokenizer, None, 0).train, 70)
    other = take(build_streaming(stream_cfg(corpus, shuffle_buffer=10), "pt", tiny_tokenizer, None, 1).train, 70)
    assert shuffled == again and shuffled != other and shuffled != plain
    for w in range(7):  # each window holds the same blocks as the plain stream's, in another order
        assert sorted(shuffled[10 * w: 10 * w + 10]) == sorted(plain[10 * w: 10 * w + 10])


@pytest.mark.parametrize("with_start", [True, False])
def test_resume_anywhere_gives_the_uninterrupted_rows(corpus, tiny_tokenizer, with_start):
    cfg = stream_cfg(corpus, shuffle_buffer=7)
    first = build_streaming(cfg, "pt", tiny_tokenizer, None, 3).train
    uninterrupted = take(first, 600)
    n_blocks = len(build_in_memory(cfg, "pt", tiny_tokenizer, None, 0).train)
    # inside a window, at a window boundary, across the end of the corpus (a window spanning two passes), later
    for k in (5, 7, 20, n_blocks - 3, n_blocks + 11, 2 * n_blocks + 1):
        running = build_streaming(cfg, "pt", tiny_tokenizer, None, 3).train
        take(running, k + 2)  # a trainer has read a little ahead of what it consumed when it saves
        state = running.state(k)
        assert state["start"] is not None
        resumed = build_streaming(cfg, "pt", tiny_tokenizer, None, 3).train
        start = Position.from_dict(state["start"]) if with_start else None
        resumed.resume(k, start)
        assert take(resumed, 25) == uninterrupted[k: k + 25], k


def test_checkpoint_state_file_round_trip(corpus, tiny_tokenizer, tmp_path):
    cfg = stream_cfg(corpus, shuffle_buffer=5)
    dataset = build_streaming(cfg, "pt", tiny_tokenizer, None, 0).train
    uninterrupted = take(dataset, 40)
    args = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=3, world_size=1,
                           output_dir=str(tmp_path), ignore_data_skip=False)
    (tmp_path / "checkpoint-4").mkdir()
    callback = StreamStateCallback(dataset)
    callback.on_save(args, SimpleNamespace(global_step=4, is_world_process_zero=True), None)
    saved = json.loads((tmp_path / "checkpoint-4" / STATE_FILE).read_text())
    assert saved["rows"] == 24 and saved["start"] is not None
    fresh = build_streaming(cfg, "pt", tiny_tokenizer, None, 0).train
    StreamStateCallback(fresh).on_train_begin(args, SimpleNamespace(global_step=4), None)
    assert args.ignore_data_skip and fresh.rows_done == 24 and fresh._start is not None
    assert take(fresh, 16) == uninterrupted[24:40]


@pytest.mark.slow  # three short Trainer runs
def test_resume_through_the_trainer_matches_an_uninterrupted_run(corpus, tiny_tokenizer, tiny_llama, tmp_path):
    """4 steps in one go vs 2 steps, a checkpoint, and 2 more steps resumed: the same batches at steps 3-4."""
    import torch
    from transformers import Trainer, TrainingArguments

    from tuneforge.data.packing import PaddingCollator

    cfg = stream_cfg(corpus, shuffle_buffer=6)

    def run(out: Path, steps: int, resume: bool):
        seen: list[list[list[int]]] = []
        collate = PaddingCollator(tiny_tokenizer.pad_token_id)

        def collator(rows):
            seen.append([r["input_ids"] for r in rows])
            return collate(rows)

        dataset = build_streaming(cfg, "pt", tiny_tokenizer, None, 0).train
        args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, save_steps=2, save_strategy="steps", report_to=[],
                                 use_cpu=True, logging_steps=100, learning_rate=1e-3, disable_tqdm=True)
        torch.manual_seed(0)
        trainer = Trainer(model=tiny_llama, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[StreamStateCallback(dataset)])
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2") if resume else None)
        return seen

    whole = run(tmp_path / "a", 4, False)
    half = run(tmp_path / "b", 2, False)
    assert (tmp_path / "b" / "checkpoint-2" / STATE_FILE).is_file()
    rest = run(tmp_path / "b", 4, True)
    assert half == whole[: len(half)]
    assert rest[:4] == whole[4:8]  # steps 3 and 4: two accumulated batches each


def test_streaming_is_refused_where_it_cannot_work(corpus, tiny_tokenizer):
    from pydantic import ValidationError

    from tuneforge.config.schema import RunConfig

    base = {"model": {"name_or_path": "x"}, "data": {"train": corpus, "streaming": True}}
    with pytest.raises(ValidationError, match="needs train.max_steps"):
        RunConfig(**base, stage="pt")
    # sft gets the fix that helps it (drop the key: prepared data is memory-mapped), not "set max_steps"
    with pytest.raises(ValidationError, match="is for stage pt .*not stage 'sft': remove data.streaming"):
        RunConfig(**base, stage="sft", train={"max_steps": 10})
    RunConfig(**base, stage="pt", train={"max_steps": 10})
    with pytest.raises(UserError, match="data.eval_split needs the whole corpus"):
        build_streaming(stream_cfg(corpus, eval_split=0.1), "pt", tiny_tokenizer, None, 0)
    with pytest.raises(UserError, match="data file not found"):
        build_streaming(stream_cfg(["nope.jsonl"]), "pt", tiny_tokenizer, None, 0)
    with pytest.raises(UserError, match="shorter than one block"):
        take(build_streaming(stream_cfg(corpus[:1], max_length=10**6), "pt", tiny_tokenizer, None, 0).train, 1)


def test_eval_file_is_prepared_beside_the_stream(corpus, tiny_tokenizer, tmp_path):
    cfg = stream_cfg(corpus[:1], eval=corpus[1], cache_dir=str(tmp_path / "cache"))
    bundle = build_streaming(cfg, "pt", tiny_tokenizer, None, 0)
    ref = build_in_memory(DataConfig(train=[corpus[1]], max_length=32, clean={"dedup": False}), "pt",
                          tiny_tokenizer, None, 0)
    assert list(bundle.eval) == ref.train and bundle.stats["eval_rows"] == len(ref.train)


def test_data_preview_of_a_streaming_run_reads_only_the_head(corpus, tmp_path, capsys):
    import yaml

    from tuneforge.cli import main

    config = {"run_name": "p", "stage": "pt",
              "model": {"from_config": {"architecture": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                                        "vocab_size": 400}},
              "data": {"train": corpus, "max_length": 32, "streaming": True}, "train": {"max_steps": 5}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["data", "preview", str(path), "-n", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2 and all(len(r["input_ids"]) == 32 and r["labels"] == r["input_ids"] for r in rows)
