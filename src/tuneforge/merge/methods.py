"""Model-merging methods, registered by name, each applied to one tensor at a time.

A method receives, for one parameter name, the base tensor (when the method uses one) and the tensors of the
other models, with each model's parameters (``weight``, ``density``, ...) and the recipe's shared parameters
(``normalize``, ``t``, ``lambda``, ...). Parameter names and defaults follow mergekit so its recipes work as they are.
All arithmetic is done in float32 (float64 stays float64); the caller casts to the output dtype.

Adding a method = one class with ``@register("name")`` and its paper in the docstring.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tuneforge.errors import UserError, did_you_mean

_REGISTRY: dict[str, type[MergeMethod]] = {}


class MergeMethod:
    """Base class of a merge method.

    Class attributes callers rely on: ``name``; ``reference`` (paper); ``uses_base`` (``"required"``,
    ``"optional"`` or ``"never"``); ``shared_params`` and ``model_params`` (parameter name → default; ``None``
    marks a required parameter).
    """

    name: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    uses_base: ClassVar[str] = "required"
    shared_params: ClassVar[dict[str, Any]] = {}
    model_params: ClassVar[dict[str, Any]] = {}

    def check(self, n_models: int, has_base: bool) -> None:
        """Raise UserError when the recipe's model count does not suit this method."""
        if self.uses_base == "required" and not has_base:
            raise UserError(f"merge_method {self.name!r} needs base_model (the model the others were tuned from)")
        if n_models < 1:
            raise UserError(f"merge_method {self.name!r} needs at least one model besides the base in models:")

    def merge(self, base: Any, tensors: list, params: list[dict], shared: dict, *, generator: Any = None):
        """The merged tensor (float32/64) for one parameter name."""
        raise NotImplementedError


def register(name: str):
    """Class decorator: make a :class:`MergeMethod` available as ``merge_method: <name>``."""

    def wrap(cls: type[MergeMethod]) -> type[MergeMethod]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def known_merge_methods() -> list[str]:
    """Every name accepted by ``merge_method``."""
    return sorted(_REGISTRY)


def get_merge_method(name: str) -> MergeMethod:
    """An instance of the merge method ``name``.

    Raises:
        UserError: unknown name, listing the known ones.
    """
    if name not in _REGISTRY:
        raise UserError(f"merge_method: unknown method {name!r}{did_you_mean(name, _REGISTRY)}; "
                        f"known: {', '.join(known_merge_methods())}")
    return _REGISTRY[name]()


def _work(tensor):
    import torch

    return tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)


@register("linear")
class Linear(MergeMethod):
    """Weighted average of the models: Σ wᵢ·Wᵢ / Σ wᵢ (``normalize: false`` drops the division).

    Wortsman et al., 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
    increasing inference time", https://arxiv.org/abs/2203.05482. The base model takes part only if it is listed
    in ``models``.
    """

    uses_base = "never"
    shared_params = {"normalize": True}
    model_params = {"weight": 1.0}

    def merge(self, base, tensors, params, shared, *, generator=None):
        weights = [float(p["weight"]) for p in params]
        total = sum(weights)
        result = sum(w * _work(t) for w, t in zip(weights, tensors, strict=True))
        if shared["normalize"]:
            if abs(total) < 1e-8:
                raise UserError("linear merge: the model weights sum to 0, so they cannot be normalised; "
                                "change the weights or set parameters: {normalize: false}")
            result = result / total
        return result


def slerp(t: float, v0, v1, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Spherical linear interpolation between two tensors (treated as flat vectors).

    Follows the great circle between the directions of ``v0`` and ``v1``; when they are nearly parallel or
    antiparallel (|cos Ω| > ``dot_threshold``) or either is ~zero, sin Ω → 0 makes the formula unstable, so it falls
    back to linear interpolation. ``t = 0`` gives ``v0``, ``t = 1`` gives ``v1``.
    """
    import torch

    a, b = _work(v0), _work(v1)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if norm_a < eps or norm_b < eps:
        return (1 - t) * a + t * b
    dot = torch.clamp(((a / norm_a) * (b / norm_b)).sum(), -1.0, 1.0)
    if abs(float(dot)) > dot_threshold:
        return (1 - t) * a + t * b
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / sin_theta) * a + (torch.sin(t * theta) / sin_theta) * b


@register("slerp")
class Slerp(MergeMethod):
    """Spherical linear interpolation between the base (t=0) and one other model (t=1), tensor by tensor.

    SLERP(v₀, v₁, t) = sin((1-t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁ with cos Ω = v₀·v₁ / (|v₀||v₁|); nearly parallel
    tensors use linear interpolation. Shoemake, 1985, "Animating rotation with quaternion curves" (SIGGRAPH);
    popularised for LLM merging by mergekit (Goddard et al., 2024, https://arxiv.org/abs/2403.13257).
    """

    shared_params = {"t": None}
    model_params = {}

    def check(self, n_models, has_base):
        super().check(n_models, has_base)
        if n_models != 1:
            raise UserError(f"merge_method 'slerp' interpolates between base_model and exactly one other model; "
                            f"the recipe has {n_models} models besides the base")

    def merge(self, base, tensors, params, shared, *, generator=None):
        t = float(shared["t"])
        return slerp(t, base, tensors[0])


def sparsify_magnitude(delta, density: float):
    """Keep the ``density`` fraction of entries with the largest magnitude (at least one), zero the rest."""
    import torch

    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    mask = torch.zeros_like(flat)
    mask[keep] = 1
    return (flat * mask).reshape(delta.shape)


def sparsify_dare(delta, density: float, generator=None):
    """DARE: drop each entry with probability p = 1 - density, rescale the kept ones by 1/(1-p)."""
    import torch

    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    return delta * keep.to(delta.dtype) / density


def sign_consensus_mask(deltas):
    """TIES sign election: per entry, the sign of the summed (weighted) deltas (ties → +); mask of agreeing deltas."""
    import torch

    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == elected


class TaskVectorMerge(MergeMethod):
    """Shared algorithm of the task-vector methods: W = W_base + λ · combine(sparsify(wᵢ · (Wᵢ - W_base))).

    Subclasses choose the sparsification (none / magnitude / DARE), whether signs are elected, and the default of
    ``normalize`` (divide by the sum of the weights that contributed to each entry).
    """

    sparsification: ClassVar[str | None] = None
    consensus: ClassVar[bool] = False
    shared_params = {"normalize": False, "lambda": 1.0}
    model_params = {"weight": 1.0, "density": 1.0}

    def merge(self, base, tensors, params, shared, *, generator=None):
        import torch

        base_w = _work(base)
        deltas = []
        for tensor, p in zip(tensors, params, strict=True):
            delta = _work(tensor) - base_w
            density = float(p["density"])
            if not 0 <= density <= 1:
                raise UserError(f"parameter density must be between 0 and 1, got {density}")
            if self.sparsification == "magnitude":
                delta = sparsify_magnitude(delta, density)
            elif self.sparsification == "dare":
                delta = sparsify_dare(delta, density, generator)
            deltas.append(delta)
        stacked = torch.stack(deltas)
        weights = torch.tensor([float(p["weight"]) for p in params], dtype=stacked.dtype)
        weights = weights.reshape(-1, *([1] * base_w.dim()))
        stacked = stacked * weights
        if self.consensus:
            mask = sign_consensus_mask(stacked).to(stacked.dtype)
            mixed = (stacked * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = stacked.sum(dim=0)
            divisor = weights.sum(dim=0).expand_as(mixed).clone()
            divisor[divisor.abs() < 1e-8] = 1
        if shared["normalize"]:
            mixed = mixed / divisor
        return base_w + float(shared["lambda"]) * mixed


@register("task_arithmetic")
class TaskArithmetic(TaskVectorMerge):
    """Task arithmetic: W = W_base + λ · Σ wᵢ · τᵢ with task vectors τᵢ = Wᵢ - W_base; a negative weight subtracts a skill.

    Ilharco et al., 2023, "Editing models with task arithmetic", https://arxiv.org/abs/2212.04089.
    """


@register("ties")
class Ties(TaskVectorMerge):
    """TIES-merging: trim each task vector to its top-``density`` magnitudes, elect a sign per entry, disjoint mean.

    Only the deltas whose sign agrees with the elected sign (sign of the summed trimmed deltas) are averaged,
    weighted by ``weight``. Yadav et al., 2023, "TIES-Merging: Resolving interference when merging models",
    https://arxiv.org/abs/2306.01708.
    """

    sparsification = "magnitude"
    consensus = True
    shared_params = {"normalize": True, "lambda": 1.0}


@register("dare_linear")
class DareLinear(TaskVectorMerge):
    """DARE on task arithmetic: drop each delta entry with probability p = 1 - density, rescale by 1/(1-p), sum.

    Yu et al., 2024, "Language models are Super Mario: absorbing abilities from homologous models as a free lunch",
    https://arxiv.org/abs/2311.03099. Seeded by the recipe's ``parameters: {seed: N}`` (default 0).
    """

    sparsification = "dare"


@register("dare_ties")
class DareTies(TaskVectorMerge):
    """DARE drop-and-rescale followed by TIES sign election and disjoint merge.

    Yu et al., 2024, https://arxiv.org/abs/2311.03099 (DARE) with Yadav et al., 2023,
    https://arxiv.org/abs/2306.01708 (TIES).
    """

    sparsification = "dare"
    consensus = True
