"""Retention terms (train/retention/): EWC, L2-SP, KD to the start model, teacher distillation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import stdlib_texts, tiny_run_config
from tuneforge.errors import UserError


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    words = ["list", "tuple", "dict", "set", "str", "int"]
    with open(folder / "train.jsonl", "w") as handle:
        for i in range(96):
            word = words[i % len(words)]
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"Name the type number {i}: {word}?"},
                                                  {"role": "assistant", "content": word}]}) + "\n")
    with open(folder / "general.jsonl", "w") as handle:
        for doc in stdlib_texts(60)[:20]:
            handle.write(json.dumps({"text": doc[:600]}) + "\n")
    return folder


def _cfg(out: Path, data: Path, **train) -> dict:
    return tiny_run_config(out, data / "train.jsonl", seed=3, max_length=96,
                           train={"max_steps": 6, "batch_size": 4, "lr": 3e-3, "logging_steps": 2,
                                  "monitor": {"enabled": False}, **train})


def _train(raw: dict, **kwargs):
    from tuneforge.config import validate_config
    from tuneforge.train.run import run_training

    lines: list[str] = []
    result = run_training(validate_config(raw), echo=lines.append, **kwargs)
    return result, lines


def _adapter_state(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def _logged(run_dir: Path, key: str) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if line.get("event") == "log" and key in line]


# ----------------------------------------------------------------------------- the formulas


def test_ewc_penalty_equals_a_hand_computation(tiny_llama):
    import torch

    from tuneforge.train.retention.ewc import ewc_penalty

    names = ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
    params = {n: p for n, p in tiny_llama.named_parameters() if n in names}
    gen = torch.Generator().manual_seed(0)
    anchor = {n: (p.detach() + torch.randn(p.shape, generator=gen) * 0.1) for n, p in params.items()}
    fisher = {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}
    lam = 7.5
    by_hand = 0.0
    for n, p in params.items():  # element by element, in Python floats
        for theta, star, f in zip(p.detach().flatten().tolist(), anchor[n].flatten().tolist(),
                                  fisher[n].flatten().tolist(), strict=True):
            by_hand += f * (theta - star) ** 2
    by_hand *= lam / 2
    penalty = ewc_penalty(params, fisher, anchor, lam)
    assert float(penalty) == pytest.approx(by_hand, rel=1e-5)
    penalty.backward()  # d/dθ = λ F (θ − θ*)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, lam * fisher[n] * (p.detach() - anchor[n]))


def test_diagonal_fisher_is_the_mean_squared_per_sample_gradient(tiny_llama):
    import torch

    from tuneforge.train.retention.ewc import diagonal_fisher

    samples = [{"input_ids": [5, 9, 17, 3, 8], "labels": [5, 9, 17, 3, 8]},
               {"input_ids": [40, 2, 77, 31], "labels": [-100, -100, 77, 31]},
               {"input_ids": [12, 13, 14], "labels": [12, 13, 14]}]
    for name, p in tiny_llama.named_parameters():
        p.requires_grad_("layers.1" in name)  # as for an adapter: only some parameters train
    params = {n: p for n, p in tiny_llama.named_parameters() if p.requires_grad}
    tiny_llama.train()
    fisher = diagonal_fisher(tiny_llama, samples)
    assert set(fisher) == set(params) and tiny_llama.training
    assert all(p.grad is None for p in tiny_llama.parameters())
    # by hand: per-sample mean NLL of the scored next tokens, its gradient, squared, averaged
    tiny_llama.eval()
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in samples:
        logits = tiny_llama(input_ids=torch.tensor([s["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(s["labels"][1:])
        keep = targets != -100
        nll = -torch.log_softmax(logits[keep], -1).gather(1, targets[keep, None]).mean()
        grads = torch.autograd.grad(nll, list(params.values()))
        for (n, _), g in zip(params.items(), grads, strict=True):
            expected[n] += g ** 2 / len(samples)
    for n in params:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-10)
    assert sum(float(f.sum()) for f in fisher.values()) > 0


def test_kd_loss_equals_a_reference_kl():
    import torch
    import torch.nn.functional as F

    from tuneforge.train.retention.kd import kd_loss, next_token_mask

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=gen)
    teacher = torch.randn(2, 5, 11, generator=gen)
    labels = torch.tensor([[-100, -100, 4, 5, 6], [-100, 1, 2, -100, -100]])
    mask = next_token_mask(labels)
    assert mask.tolist() == [[False, True, True, True, False], [True, True, False, False, False]]
    T = 2.0
    got = kd_loss(student, teacher, mask, T)
    # torch's own KL(teacher ‖ student) summed over the 5 scored positions, times T², averaged
    ref = F.kl_div(F.log_softmax(student[mask] / T, -1), F.log_softmax(teacher[mask] / T, -1), log_target=True,
                   reduction="sum") / 5 * T ** 2
    assert float(got) == pytest.approx(float(ref), rel=1e-6)
    # and one position by hand
    s, t = student[0, 1] / T, teacher[0, 1] / T
    ps = [math.exp(v) for v in s.tolist()]
    pt = [math.exp(v) for v in t.tolist()]
    ps = [v / sum(ps) for v in ps]
    pt = [v / sum(pt) for v in pt]
    one = sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True)) * T ** 2
    single = torch.zeros_like(mask)
    single[0, 1] = True
    assert float(kd_loss(student, teacher, single, T)) == pytest.approx(one, rel=1e-5)
    assert float(kd_loss(teacher, teacher, mask, T)) == pytest.approx(0.0, abs=1e-6)


def test_l2sp_penalty_is_half_lambda_squared_distance(tiny_llama):
    import torch

    from tuneforge.train.retention.l2sp import l2sp_penalty

    params = {n: p for n, p in tiny_llama.named_parameters() if n == "model.norm.weight"}
    anchor = {n: p.detach() - 0.5 for n, p in params.items()}
    n_elem = sum(p.numel() for p in params.values())
    assert float(l2sp_penalty(params, anchor, 0.2)) == pytest.approx(0.1 * 0.25 * n_elem, rel=1e-6)
    assert float(l2sp_penalty(params, {n: p.detach().clone() for n, p in params.items()}, 3.0)) == 0.0
    assert isinstance(l2sp_penalty(params, anchor, 1.0), torch.Tensor)


# ----------------------------------------------------------------------------- in training


def test_disabled_retention_leaves_training_bit_identical(tmp_path, data):
    import torch

    plain, _ = _train(_cfg(tmp_path / "plain", data))
    zero, _ = _train(_cfg(tmp_path / "zero", data, retention={"method": "ewc", "lambda": 0.0,
                                                               "reference": str(data / "general.jsonl"),
                                                               "samples": 4}))
    a, b = _adapter_state(plain.run_dir), _adapter_state(zero.run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _logged(plain.run_dir, "loss") == _logged(zero.run_dir, "loss")
    assert _logged(zero.run_dir, "ewc_penalty") == [0.0] * len(_logged(zero.run_dir, "ewc_penalty"))


def test_ewc_trains_logs_its_penalty_and_resume_reads_the_fisher(tmp_path, data):
    import torch

    plain, _ = _train(_cfg(tmp_path / "plain", data, max_steps=8))
    raw = _cfg(tmp_path / "ewc", data, max_steps=4, save_steps=4,
               retention={"method": "ewc", "lambda": 1e4, "reference": "pydoc", "samples": 8})
    first, lines = _train(raw)
    saved = tmp_path / "ewc" / "retention" / "ewc.safetensors"
    assert saved.is_file() and any("diagonal Fisher" in line for line in lines)
    penalties = _logged(first.run_dir, "ewc_penalty")
    assert penalties and penalties[0] == 0.0 and penalties[-1] > 0  # zero at the start weights, grows
    mtime = saved.stat().st_mtime_ns
    raw["train"]["max_steps"] = 8
    resumed, lines = _train(raw, resume=True)
    assert any("read from" in line for line in lines) and saved.stat().st_mtime_ns == mtime
    summary = json.loads((tmp_path / "ewc" / "summary.json").read_text())
    assert summary["retention"]["ewc"]["fisher_from_run"] is True and summary["retention"]["ewc"]["fisher_sum"] > 0
    # the penalty held the adapter closer to its start than plain training
    start = {k: v for k, v in _adapter_state(plain.run_dir).items()}
    drift_plain = sum(float(v.norm()) for k, v in start.items() if "lora_B" in k)
    drift_ewc = sum(float(v.norm()) for k, v in _adapter_state(resumed.run_dir).items() if "lora_B" in k)
    assert drift_ewc < drift_plain
    assert torch.is_tensor(next(iter(start.values())))


def test_l2sp_and_kd_train_with_their_terms_logged(tmp_path, data):
    l2sp, _ = _train(_cfg(tmp_path / "l2sp", data, retention={"method": "l2sp", "lambda": 1.0}))
    assert (tmp_path / "l2sp" / "retention" / "l2sp.safetensors").is_file()
    assert _logged(l2sp.run_dir, "l2sp_penalty")[-1] > 0
    kd, lines = _train(_cfg(tmp_path / "kd", data, grad_accum=2,
                            retention={"method": "kd", "alpha": 1.0, "reference": str(data / "general.jsonl"),
                                       "samples": 6, "batch_size": 2}))
    values = _logged(kd.run_dir, "kd_loss")
    assert values[0] == pytest.approx(0.0, abs=1e-6) and values[-1] > 0  # adapter starts as a no-op (B = 0)
    assert any("adapter disabled" in line for line in lines)
    assert kd.summary["retention"]["kd"]["teacher"] == "adapter disabled"


def test_full_fine_tuning_kd_keeps_a_frozen_copy(tmp_path, data):
    raw = _cfg(tmp_path / "full", data, max_steps=3,
               retention={"method": "kd", "reference": str(data / "general.jsonl"), "samples": 4})
    raw["method"] = {"name": "full"}
    result, _ = _train(raw)
    assert result.summary["retention"]["kd"]["teacher"] == "frozen copy"
    assert _logged(result.run_dir, "kd_loss")[-1] > 0


def test_distill_from_a_teacher_run(tmp_path, data):
    teacher, _ = _train(_cfg(tmp_path / "teacher", data, max_steps=6))
    raw = _cfg(tmp_path / "student", data, max_steps=4, distill={"teacher": str(teacher.run_dir), "alpha": 0.5})
    raw["model"] = {"name_or_path": str(teacher.run_dir / "base")}
    student, lines = _train(raw)
    assert _logged(student.run_dir, "distill_loss")[0] > 0
    assert student.summary["retention"]["distill"]["teacher"] == str(teacher.run_dir)


# ----------------------------------------------------------------------------- bad input


def _cli_train(tmp_path, raw) -> int:
    import yaml

    from tuneforge.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    return main(["train", str(config)])


@pytest.mark.parametrize("section, message", [
    ({"retention": {"method": "ewc", "lambda": 1.0}}, "needs train.retention.reference"),
    ({"retention": {"method": "l2sp"}}, "needs train.retention.lambda"),
    ({"retention": {"method": "kd", "lambda": 1.0, "reference": "pydoc"}}, "weighted by train.retention.alpha"),
    ({"retention": {"method": "l2sp", "lambda": 1.0, "reference": "pydoc"}}, "uses no reference data"),
    ({"retention": {"method": "kd", "reference": "no/such/general.jsonl"}}, "train.retention.reference: "),
    ({"distill": {"teacher": "no/such/teacher-run"}}, "train.distill.teacher: "),
])
def test_bad_retention_input_exits_2_and_writes_nothing(tmp_path, data, capsys, section, message):
    out = tmp_path / "run"
    raw = _cfg(out, data, **section)
    assert _cli_train(tmp_path, raw) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_teacher_with_another_vocabulary_is_refused(tmp_path, data):
    from tuneforge.config import validate_config
    from tuneforge.train.retention import build_retention

    teacher, _ = _train(_cfg(tmp_path / "teacher", data, max_steps=1))
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(str(teacher.run_dir / "final"))
    other.add_tokens(["<extra-token>"])
    cfg = validate_config(_cfg(tmp_path / "s", data, distill={"teacher": str(teacher.run_dir)}))
    with pytest.raises(UserError, match="train.distill.teacher: .*another tokenizer"):
        build_retention(cfg, other, None)


def test_every_retention_method_is_a_registered_term():
    from tuneforge.config.retention import RETENTION_CONFIGS
    from tuneforge.train.retention import known_terms

    assert set(RETENTION_CONFIGS) | {"distill"} == set(known_terms())


def test_a_term_counts_once_per_optimizer_step_under_gradient_accumulation(tmp_path, data):
    import torch

    def run(name, batch, accum):
        raw = _cfg(tmp_path / name, data, max_steps=3, batch_size=batch, grad_accum=accum,
                   retention={"method": "l2sp", "lambda": 50.0})
        raw["method"]["dropout"] = 0.0
        raw["data"]["packing"] = False  # the same samples per optimizer step either way
        raw["train"]["lr"] = 1e-2
        return _adapter_state(_train(raw)[0].run_dir)

    whole, split = run("b4", 4, 1), run("b2x2", 2, 2)
    for key in whole:
        torch.testing.assert_close(whole[key], split[key], rtol=1e-4, atol=1e-5)
