"""Training engine: one trainer loop, optimizers and schedules, safetensors+JSON checkpoints.

Example:
    >>> import torch, aal
    >>> from aal.engine import Trainer, build_optimizer, build_scheduler
    >>> from aal.methods import create_method
    >>> model = aal.create_model("small_cnn")
    >>> data = [(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    >>> opt = build_optimizer(model, lr=0.01)
    >>> records = Trainer(model, create_method("standard"), data, opt, progress=False).fit()
    >>> len(records)
    1
"""

from aal.engine.checkpoint import (
    load_checkpoint,
    load_model_weights,
    resolve_checkpoint,
    save_checkpoint,
    save_model_weights,
)
from aal.engine.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler, lr_factor_fn, param_groups
from aal.engine.trainer import RunningMeans, Trainer

__all__ = [
    "OPTIMIZERS",
    "RunningMeans",
    "SCHEDULES",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "load_checkpoint",
    "load_model_weights",
    "lr_factor_fn",
    "param_groups",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_model_weights",
]
