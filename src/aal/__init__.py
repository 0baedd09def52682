"""aal: Associative Adversarial Learning and an adversarial-robustness toolkit for PyTorch.

Images are in [0,1] everywhere; normalisation lives inside models. The main entry points:

* :func:`aal.create_model` and :mod:`aal.models` (registry of architectures),
* :mod:`aal.attacks` (``attack(model, x, y, mask=None) -> x_adv``),
* :mod:`aal.methods` (``method(model, batch) -> Output``),
* :mod:`aal.engine` (the trainer and checkpoints), :mod:`aal.eval` (the evaluator), and
  :func:`aal.benchmark` (any model's robustness: AutoAttack's standard suite on a dataset),
* :mod:`aal.data` (datasets from their official files), :mod:`aal.config`.

Importing aal has no side effects beyond registering built-in components.
"""

from aal import attacks, attention, data, engine, eval, methods, models
from aal.data import load_data
from aal.engine import Trainer
from aal.eval import evaluate
from aal.eval.external import benchmark
from aal.methods import create_method
from aal.models import create_model

__version__ = "0.1.0"

__all__ = [
    "Trainer",
    "__version__",
    "attacks",
    "attention",
    "benchmark",
    "create_method",
    "create_model",
    "data",
    "engine",
    "eval",
    "evaluate",
    "load_data",
    "methods",
    "models",
]
