"""Randomised models: detect them, and attack them with Expectation over Transformation (EOT).

A purification defence (AToP's random transforms, input noise, random resizing, ...) gives a
different output on every forward pass. A gradient taken on one draw points somewhere a single
other draw disagrees with, so plain attacks overestimate the robustness of such models
(Athalye, Carlini & Wagner 2018, "Obfuscated Gradients Give a False Sense of Security", Sec. 4.2;
AutoAttack's ``version='rand'``). The remedy is EOT: optimise the *expected* model.

* :func:`is_randomized` / :func:`randomness`: run the same batch several times and compare
  (as AutoAttack's ``check_randomized``: predictions or L2-normalised outputs differ).
* :class:`EOTWrapper`: a module whose forward is the **mean of the logits over ``n`` draws**,
  each draw with its own autograd graph, so the input gradient of any loss of the wrapper is
  the average of the per-draw Jacobians applied to the loss gradient at the mean logits.

What the literature says and what we chose: Athalye et al. average the gradient of the *loss*
over draws, ``E_t[grad L(f_t(x))]``; AutoAttack-rand does the same inside APGD (``eot_iter``).
Our attacks share one contract, ``attack(model, x, y)``, and never see the draws, so the
wrapper averages the *logits*: ``grad L(E_t[f_t(x)])``. Both are unbiased for their own
objective; the logit average is the gradient of a smooth surrogate (the expected classifier)
and works with every attack and loss unchanged (APGD-CE/DLR/T, Square's score queries, PGD,
CW). It costs ``n`` forward/backward passes per attack step. Robustness is always *judged* on
the original model (one draw per evaluation, as AutoAttack-rand), not on the wrapper.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Noisy(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 3)
    ...     def forward(self, x):
    ...         return self.fc(x + 0.1 * torch.randn_like(x))
    >>> model = Noisy()
    >>> is_randomized(model, torch.rand(8, 4))
    True
    >>> eot = EOTWrapper(model, n=10)
    >>> eot(torch.rand(8, 4)).shape
    torch.Size([8, 3])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from aal.utils.modes import eval_mode


def _normalised(out: Tensor) -> Tensor:
    flat = out.detach().float().flatten(1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-10)


@torch.no_grad()
def randomness(model: nn.Module, x: Tensor, n: int = 3, atol: float = 1e-4) -> dict[str, Any]:
    """How much ``model``'s outputs on ``x`` vary across ``n`` forward passes (eval mode).

    Args:
        model: the classifier; put in eval mode for the call, every submodule's mode restored.
        x: a batch (B,...) of inputs in [0,1].
        n: number of passes (>= 2).
        atol: largest L2 distance between L2-normalised outputs still counted as identical
            (AutoAttack's ``alpha``); absorbs non-deterministic kernels.

    Returns:
        ``{"randomized": bool, "max_output_diff": float, "prediction_flips": int, "passes": n}``:
        ``max_output_diff`` is the largest distance between normalised outputs of one sample
        in two passes; ``prediction_flips`` the number of samples whose argmax changed.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 passes, got {n}")
    with eval_mode(model):
        outs = [model(x) for _ in range(n)]
    normed = [_normalised(o) for o in outs]
    max_diff = max(float((normed[i] - normed[0]).norm(dim=1).max()) for i in range(1, n)) if len(x) else 0.0
    preds = torch.stack([o.argmax(1) for o in outs]) if outs[0].dim() == 2 else None
    flips = int((preds != preds[0]).any(0).sum()) if preds is not None else 0
    return {"randomized": bool(flips > 0 or max_diff > atol), "max_output_diff": max_diff, "prediction_flips": flips, "passes": n}


def is_randomized(model: nn.Module, x: Tensor, n: int = 3, atol: float = 1e-4) -> bool:
    """True if ``n`` forward passes of ``model`` on ``x`` disagree (see :func:`randomness`).

    Example:
        >>> import torch
        >>> is_randomized(torch.nn.Linear(4, 2), torch.rand(3, 4))
        False
    """
    return randomness(model, x, n=n, atol=atol)["randomized"]


class EOTWrapper(nn.Module):
    """Expectation over Transformation: the mean of ``n`` draws of a randomised model's logits.

    ``forward(x) = (1/n) * sum_k model(x)`` where each call draws its own randomness and keeps
    its own graph, so ``d/dx`` of any loss of the output averages the ``n`` per-draw Jacobians
    (see the module docstring for why logits, not losses, are averaged). The wrapped model is a
    submodule: ``eval()``/``train()`` and ``requires_grad`` switches of the attacks reach it.

    Args:
        model: the randomised classifier, images in [0,1] -> logits (B, K).
        n: draws per forward pass (>= 1); AutoAttack-rand uses 20.
        chunk: if > 1, run up to ``chunk`` draws in one forward pass on a batch repeated
            ``chunk`` times (faster for small batches; the model must draw its randomness per
            sample, not once per batch, for the two to agree). Default 1: one call per draw.

    Example:
        >>> import torch
        >>> eot = EOTWrapper(torch.nn.Linear(4, 2), n=3)
        >>> x = torch.rand(5, 4, requires_grad=True)
        >>> eot(x).sum().backward(); x.grad.shape
        torch.Size([5, 4])
    """

    def __init__(self, model: nn.Module, n: int = 20, chunk: int = 1) -> None:
        super().__init__()
        if int(n) < 1:
            raise ValueError(f"EOT needs n >= 1 draws, got {n}")
        if int(chunk) < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model = model
        self.n = int(n)
        self.chunk = int(chunk)

    def forward(self, x: Tensor) -> Tensor:
        total: Tensor | None = None
        done = 0
        while done < self.n:
            k = min(self.chunk, self.n - done)
            if k == 1:
                out = self.model(x)
            else:
                out = self.model(x.repeat(k, *([1] * (x.dim() - 1)))).unflatten(0, (k, x.shape[0])).sum(0)
            total = out if total is None else total + out
            done += k
        assert total is not None
        return total / self.n

    def extra_repr(self) -> str:
        return f"n={self.n}, chunk={self.chunk}"


__all__ = ["EOTWrapper", "is_randomized", "randomness"]
