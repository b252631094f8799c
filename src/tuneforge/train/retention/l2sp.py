"""L2-SP — Li, Grandvalet & Davoine, 2018, "Explicit inductive bias for transfer learning with convolutional
networks" (ICML).

    L = L_task(θ) + λ/2 · Σ_i (θ_i − θ*_i)²

EWC without the Fisher: every trainable parameter is pulled towards its start value θ* with the same strength,
so no reference data is needed and nothing is computed before training (the cheap variant). θ* is saved in
``<run>/retention/l2sp.safetensors`` so that ``--resume`` pulls towards the same start. For adapters θ* is the
adapter as initialised (LoRA: B = 0), i.e. a weight decay towards "no change".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.train.retention import (
    RetentionTerm,
    load_tensors,
    register,
    save_tensors,
    trainable_parameters,
)


def l2sp_penalty(params: dict[str, Any], anchor: dict[str, Any], lam: float):
    """``lam/2 · Σ (θ_i − θ*_i)²`` over the named parameters (a scalar tensor with a graph to ``params``)."""
    total = None
    for name, p in params.items():
        term = ((p.float() - anchor[name]) ** 2).sum()
        total = term if total is None else total + term
    return 0.5 * lam * total


@register("l2sp")
class L2SP(RetentionTerm):
    log_key = "l2sp_penalty"

    def __init__(self, lam: float):
        self.lam = lam
        self.params: dict[str, Any] = {}
        self.anchor: dict[str, Any] = {}
        self.loaded = False

    @classmethod
    def from_config(cls, cfg, tokenizer, template):
        return cls(cfg.train.retention.lambda_)

    def prepare(self, model: Any, run_dir: Path) -> None:
        self.params = trainable_parameters(model)
        saved = load_tensors(run_dir, "l2sp")
        if saved is not None and all(n in saved and saved[n].shape == p.shape for n, p in self.params.items()):
            self.anchor = {n: saved[n] for n in self.params}
            self.loaded = True
        else:
            self.anchor = {n: p.detach().float().clone() for n, p in self.params.items()}
            save_tensors(run_dir, "l2sp", self.anchor)
        device = next(iter(self.params.values())).device
        self.anchor = {n: a.to(device) for n, a in self.anchor.items()}

    def loss(self, trainer, model, inputs, outputs):
        return l2sp_penalty(self.params, self.anchor, self.lam)

    def describe(self) -> dict:
        return {"method": "l2sp", "lambda": self.lam, "anchor_from_run": self.loaded}
