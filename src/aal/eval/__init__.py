"""Evaluation: clean and robust accuracy, AutoAttack-style (attack only what is still correct).

Example:
    >>> import torch, aal
    >>> from aal.eval import evaluate
    >>> model = aal.create_model("small_cnn")
    >>> res = evaluate(model, (torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))), attacks=("clean", "fgsm"))
    >>> sorted(res.to_dict()["accuracy"])
    ['clean', 'fgsm', 'robust']
"""

from aal.eval.evaluator import EvalResult, accuracy, evaluate

__all__ = ["EvalResult", "accuracy", "evaluate"]
