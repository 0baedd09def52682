"""aal: Associative Adversarial Learning and an adversarial-robustness toolkit for PyTorch.

Images are in [0,1] everywhere; normalisation lives inside models. The main entry points:

* :func:`aal.create_model` and :mod:`aal.models` (registry of architectures),
* :mod:`aal.attacks` (``attack(model, x, y, mask=None) -> x_adv``),
* :mod:`aal.methods` (``method(model, batch) -> Output``),
* :mod:`aal.engine` (the trainer and checkpoints), :mod:`aal.eval` (the evaluator), and
  :func:`aal.benchmark` (any model's robustness: AutoAttack's standard suite on a dataset),
* :mod:`aal.data` (datasets from their official files), :mod:`aal.config`.

Importing aal has no side effects beyond registering built-in components (and, only when the
process is the ``aal`` command itself, quiet Ctrl-C handling while it starts: :mod:`aal._startup`).
"""

from aal._startup import guard_cli_startup

guard_cli_startup()  # first: before the slow imports below

from aal import attacks, attention, data, engine, eval, methods, models  # noqa: E402
from aal.data import load_data  # noqa: E402
from aal.engine import Trainer  # noqa: E402
from aal.engine import run as _run  # noqa: E402,F401 (registers the run-folder readers aal.models.purifier uses)
from aal.eval import evaluate  # noqa: E402
from aal.eval.external import benchmark  # noqa: E402
from aal.methods import create_method  # noqa: E402
from aal.models import create_model  # noqa: E402

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
