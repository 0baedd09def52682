"""Standard (non-robust) training: cross-entropy on clean inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aal.methods.base import METHODS, Batch, Method, Output, split_batch


@METHODS.register("standard")
class Standard(Method):
    """Cross-entropy on the clean inputs: the non-robust baseline every table starts from.

    ``loss = CE(f(x), y)`` averaged over the batch. No hyper-parameters.

    Shapes: ``x`` (B,C,H,W) in [0,1], ``y`` (B,) class indices; ``Output.logits`` (B,K) on ``x``.

    Example:
        >>> import torch, aal
        >>> from aal.methods import create_method
        >>> model = aal.create_model("small_cnn")
        >>> out = create_method("standard")(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
        >>> out.loss.backward()
        >>> sorted(out.logs)
        ['acc_clean', 'loss_clean']
    """

    name = "standard"

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        x, y = split_batch(batch)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        with torch.no_grad():
            acc = (logits.argmax(1) == y).float().mean()
        return Output(loss, logits, {"loss_clean": float(loss.detach()), "acc_clean": float(acc)})
