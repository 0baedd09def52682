"""Evaluation: clean and robust accuracy, AutoAttack-style (attack only what is still correct).

* :func:`evaluate`: clean accuracy and accuracy under a list of attacks (:mod:`.evaluator`).
* :func:`run_suite`: the standard / fast attack ensembles (APGD-CE -> APGD-T -> Square),
  resumable, with EOT for randomised models (:mod:`.suite`, :mod:`.eot`).
* :func:`run_checks`: gradient-masking sanity checks, pass / warn / fail (:mod:`.checks`).
* per-class analytics (:mod:`.analytics`) and Markdown reports comparing runs (:mod:`.report`).

Example:
    >>> import torch, aal
    >>> from aal.eval import evaluate
    >>> model = aal.create_model("small_cnn")
    >>> res = evaluate(model, (torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))), attacks=("clean", "fgsm"))
    >>> sorted(res.to_dict()["accuracy"])
    ['clean', 'fgsm', 'robust']
"""

from aal.eval.analytics import (
    ClassReport,
    class_report,
    confusion_matrix,
    hardest_pairs,
    per_class_accuracy,
    predict_under_attack,
)
from aal.eval.checks import CHECKS, CheckReport, CheckResult, run_checks
from aal.eval.eot import EOTWrapper, is_randomized, randomness
from aal.tasks.detection_metrics import DetectionMAP, mean_average_precision, voc_ap
from aal.eval.evaluator import EvalResult, accuracy, evaluate
from aal.eval.suite import SUITES, Stage, SuiteResult, run_suite
from aal.registry import Registry

EVALUATORS: Registry = Registry("evaluator")
"""Evaluators by task name, for the tasks below this layer (:mod:`aal.tasks.classification` asks
for ``classification`` at call time, since it cannot import :mod:`aal.eval`)."""
EVALUATORS.register("classification")(evaluate)

__all__ = [
    "EVALUATORS",
    "DetectionMAP",
    "mean_average_precision",
    "voc_ap",
    "CHECKS",
    "CheckReport",
    "CheckResult",
    "ClassReport",
    "EOTWrapper",
    "EvalResult",
    "SUITES",
    "Stage",
    "SuiteResult",
    "accuracy",
    "class_report",
    "confusion_matrix",
    "evaluate",
    "hardest_pairs",
    "is_randomized",
    "per_class_accuracy",
    "predict_under_attack",
    "randomness",
    "run_checks",
    "run_suite",
]
