"""EWC — Kirkpatrick et al., 2017, "Overcoming catastrophic forgetting in neural networks" (PNAS).

    L = L_task(θ) + λ/2 · Σ_i F_i (θ_i − θ*_i)²

θ* are the start weights (for adapters: the trainable adapter weights as initialised — the frozen base cannot
move, so only trainable parameters are penalised). F is the diagonal of the empirical Fisher information at θ*
on the reference (general) data:

    F_i = 1/N · Σ_n (∂/∂θ_i  mean_t −log p(x_{n,t} | x_{n,<t}))²

one gradient per reference sample ``n`` (text: every token; chat: the answer tokens), the model in eval mode (no
dropout). F and θ* are computed once and saved in ``<run>/retention/ewc.safetensors``; ``--resume`` reads them
back instead of recomputing. For a LoRA adapter at its start (B = 0), the gradient of every A matrix is zero, so
F_A = 0: EWC then restrains the B matrices, which carry the whole update at first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.console import say
from tuneforge.train.retention import (
    RetentionTerm,
    load_tensors,
    reference_samples,
    register,
    save_tensors,
    trainable_parameters,
)


def diagonal_fisher(model: Any, samples: list[dict], progress=None) -> dict[str, Any]:
    """Empirical diagonal Fisher of the trainable parameters: mean over ``samples`` of the squared gradient of
    each sample's mean token NLL (see the module docstring). The model's mode and gradients are restored."""
    import torch

    params = trainable_parameters(model)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i, sample in enumerate(samples):
            ids = torch.tensor([sample["input_ids"]], device=device)
            labels = torch.tensor([sample["labels"]], device=device)
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=labels).loss  # mean NLL over the sample's predicted tokens
            loss.backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach().float() ** 2
            if progress:
                progress(i + 1)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    for value in fisher.values():
        value /= max(1, len(samples))
    return fisher


def ewc_penalty(params: dict[str, Any], fisher: dict[str, Any], anchor: dict[str, Any], lam: float):
    """``lam/2 · Σ F_i (θ_i − θ*_i)²`` over the named parameters (a scalar tensor with a graph to ``params``)."""
    total = None
    for name, p in params.items():
        term = (fisher[name] * (p.float() - anchor[name]) ** 2).sum()
        total = term if total is None else total + term
    return 0.5 * lam * total


@register("ewc")
class EWC(RetentionTerm):
    log_key = "ewc_penalty"

    def __init__(self, lam: float, samples: list[dict]):
        self.lam = lam
        self.samples = samples
        self.params: dict[str, Any] = {}
        self.fisher: dict[str, Any] = {}
        self.anchor: dict[str, Any] = {}
        self.loaded = False

    @classmethod
    def from_config(cls, cfg, tokenizer, template):
        r = cfg.train.retention
        return cls(r.lambda_, reference_samples(r.reference, "train.retention.reference", cfg, tokenizer, template,
                                                r.samples, cfg.seed))

    def prepare(self, model: Any, run_dir: Path) -> None:
        self.params = trainable_parameters(model)
        saved = load_tensors(run_dir, "ewc")
        if saved is not None and _matches(saved, self.params):
            self.fisher = {n: saved[f"fisher.{n}"] for n in self.params}
            self.anchor = {n: saved[f"anchor.{n}"] for n in self.params}
            self.loaded = True
            say(f"ewc: Fisher and start weights read from {run_dir}/retention/ewc.safetensors")
        else:
            self.anchor = {n: p.detach().float().clone() for n, p in self.params.items()}
            self.fisher = _fisher_with_progress(model, self.samples)
            save_tensors(run_dir, "ewc", {**{f"fisher.{n}": f for n, f in self.fisher.items()},
                                          **{f"anchor.{n}": a for n, a in self.anchor.items()}},
                         {"samples": len(self.samples)})
            say(f"ewc: diagonal Fisher of {len(self.params)} trainable tensors on {len(self.samples)} reference "
                 f"samples, saved in {run_dir}/retention/ewc.safetensors")
        device = next(iter(self.params.values())).device
        self.fisher = {n: f.to(device) for n, f in self.fisher.items()}
        self.anchor = {n: a.to(device) for n, a in self.anchor.items()}

    def loss(self, trainer, model, inputs, outputs):
        return ewc_penalty(self.params, self.fisher, self.anchor, self.lam)

    def describe(self) -> dict:
        fisher_sum = float(sum(f.sum() for f in self.fisher.values())) if self.fisher else None
        return {"method": "ewc", "lambda": self.lam, "reference_samples": len(self.samples),
                "fisher_sum": fisher_sum, "fisher_from_run": self.loaded}


def _matches(saved: dict, params: dict) -> bool:
    return all(f"fisher.{n}" in saved and saved[f"fisher.{n}"].shape == p.shape for n, p in params.items())


def _fisher_with_progress(model, samples):
    from rich.progress import Progress

    from tuneforge.console import err

    with Progress(console=err(), transient=True) as bar:
        task = bar.add_task("ewc: Fisher on reference data", total=len(samples))
        return diagonal_fisher(model, samples, progress=lambda done: bar.update(task, completed=done))
