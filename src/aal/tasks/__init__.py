"""Tasks: what loss a learner minimises, what loss the attack maximises, what metric is reported.

The attacks, attention, methods and the one trainer loop are shared by every task; a task plugs
in through the loss it gives the attack (``loss_fn(outputs, y) -> (B,)``, see
:mod:`aal.attacks.base`) and its metric. Classification is the default everywhere (cross-entropy,
accuracy). :mod:`aal.tasks.fewshot` is few-shot learning with a prototypical head (AAL paper,
Sec. 4.3): episodes, the support attack's loss, accuracy with a 95% confidence interval;
:mod:`aal.tasks.detection` is SSD object detection (Sec. 4.2). A run config names its task at the
top level (``task: fewshot``, ``task: detection``; none: classification).

Example:
    >>> from aal.tasks import FewShotTask
    >>> FewShotTask(metric="cosine", temperature=0.1).attack_loss
    'query'
"""

from aal.tasks.base import TASKS, RunTask, TaskExperiment, register_task, task_named, task_of_config
from aal.tasks.classification import ClassificationTask
from aal.tasks.fewshot import (
    FewShotDataConfig,
    FewShotEvalConfig,
    FewShotExperiment,
    FewShotRunConfig,
    FewShotTask,
    evaluate_fewshot,
    fewshot_config,
    is_fewshot_config,
    load_fewshot_config,
    mean_ci95,
)
from aal.tasks.detection import (  # noqa: E402
    DetectionRunConfig,
    DetectionTask,
    is_detection_config,
    load_detection_config,
)

__all__ = [
    "TASKS",
    "ClassificationTask",
    "RunTask",
    "TaskExperiment",
    "register_task",
    "task_named",
    "task_of_config",
    "DetectionRunConfig",
    "DetectionTask",
    "is_detection_config",
    "load_detection_config",
    "FewShotDataConfig",
    "FewShotEvalConfig",
    "FewShotExperiment",
    "FewShotRunConfig",
    "FewShotTask",
    "evaluate_fewshot",
    "fewshot_config",
    "is_fewshot_config",
    "load_fewshot_config",
    "mean_ci95",
]
