"""ORPO and SimPO losses against TRL's own implementations (trl.experimental)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tuneforge.train.stages.pairwise import orpo_loss, simpo_loss


def _logps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Average log-probs: negative, some close to 0 (the log1mexp branch near -ln 2 is exercised too).
    chosen = -torch.rand(16, generator=generator) * 3 - 1e-3
    rejected = -torch.rand(16, generator=generator) * 3 - 1e-3
    return chosen, rejected


def test_simpo_loss_equals_trl_cpo_simpo():
    from trl.experimental.cpo import CPOTrainer

    chosen, rejected = _logps(0)
    for beta, gamma, smoothing in ((2.0, 0.5, 0.0), (2.5, 1.4, 0.1)):
        fake = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta,
                               label_smoothing=smoothing, accelerator=SimpleNamespace(device="cpu"))
        expected, _, _ = CPOTrainer.cpo_loss(fake, chosen, rejected)
        torch.testing.assert_close(simpo_loss(chosen, rejected, beta, gamma, smoothing), expected)


def test_orpo_odds_ratio_term_equals_trl():
    from trl.experimental.orpo import ORPOTrainer

    chosen, rejected = _logps(1)
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    expected, _, _, _, expected_log_odds = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    ratio, log_odds = orpo_loss(chosen, rejected, 0.25)
    torch.testing.assert_close(ratio, expected)
    torch.testing.assert_close(log_odds.mean(), expected_log_odds)
