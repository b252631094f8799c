"""Check, on the actual model, that packed rows keep their samples apart.

Packing several samples in one row is only correct if the attention backend builds a block-diagonal causal
mask from ``position_ids`` (transformers does this for many architectures when no attention mask is given and
the KV cache is off). Rather than trust a list of architectures, we run two short samples packed and separately
and compare the logits: a few milliseconds, once per run.
"""

from __future__ import annotations


def packing_keeps_samples_apart(model, vocab_size: int, tolerance: float = 1e-3) -> bool:
    """True when packed-row logits equal per-sample logits for this model (with ``use_cache=False``)."""
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(3, max(vocab_size - 1, 4), (5,), generator=generator)
    second = torch.randint(3, max(vocab_size - 1, 4), (7,), generator=generator)
    packed_ids = torch.cat([first, second]).unsqueeze(0).to(device)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits.float()
            alone = model(input_ids=second.unsqueeze(0).to(device), use_cache=False).logits.float()
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    error = (packed[0, 5:] - alone[0]).abs().max().item()
    return error <= tolerance * max(1.0, alone.abs().max().item())
