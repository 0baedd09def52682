"""Per-class robustness: which classes fall, and into which classes they are pushed.

Robust accuracy is rarely uniform over classes (e.g. Fashion-MNIST's shirt / T-shirt / pullover
/ coat cluster); the hard-class-pair methods (SPAT) reweight exactly those pairs. These
functions give, from per-sample labels and predictions:

* :func:`per_class_accuracy`: accuracy per class (NaN for a class absent from the data);
* :func:`confusion_matrix`: ``C[i, j]`` = number of points of true class ``i`` predicted as
  ``j`` (under attack: predicted at the adversarial example);
* :func:`hardest_pairs`: the class pairs most often confused under attack, with *symmetrised*
  counts ``C[i, j] + C[j, i]`` (a pair is hard whichever way it is crossed);
* :func:`predict_under_attack`: clean and adversarial predictions of a model (points already
  misclassified are not attacked: their adversarial prediction is their clean one);
* :func:`class_report`: all of the above in one JSON-able dict (:class:`ClassReport`).

Example:
    >>> import torch
    >>> y = torch.tensor([0, 0, 1, 1, 2, 2])
    >>> adv = torch.tensor([0, 1, 0, 1, 1, 2])
    >>> per_class_accuracy(adv == y, y, 3).tolist()
    [0.5, 0.5, 0.5]
    >>> hardest_pairs(confusion_matrix(y, adv, 3), k=1)
    [{'a': 0, 'b': 1, 'count': 2, 'a_to_b': 1, 'b_to_a': 1, 'rate': 0.5}]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from aal.eval.evaluator import _as_tensors, model_device
from aal.utils.modes import eval_mode


def per_class_accuracy(correct: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Fraction of correct points per class, float (K,); NaN where a class has no points.

    Args:
        correct: bool (N,) per-sample correctness (clean, or robust under attack).
        labels: int (N,) true labels in ``[0, num_classes)``.
        num_classes: K.
    """
    correct, labels = torch.as_tensor(correct).flatten(), torch.as_tensor(labels).flatten().long()
    if correct.shape != labels.shape:
        raise ValueError(f"correct {tuple(correct.shape)} and labels {tuple(labels.shape)} differ in shape")
    _check_labels(labels, num_classes)
    count = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels, weights=correct.double(), minlength=num_classes)
    out = hits / count
    out[count == 0] = float("nan")
    return out.float()


def confusion_matrix(labels: Tensor, preds: Tensor, num_classes: int) -> Tensor:
    """Counts, int64 (K, K): row = true class, column = predicted class."""
    labels, preds = torch.as_tensor(labels).flatten().long(), torch.as_tensor(preds).flatten().long()
    if labels.shape != preds.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and preds {tuple(preds.shape)} differ in shape")
    _check_labels(labels, num_classes)
    _check_labels(preds, num_classes)
    return torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).view(num_classes, num_classes)


def hardest_pairs(confusion: Tensor, k: int = 5, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The ``k`` unordered class pairs ``{a, b}`` most often confused, by symmetrised count.

    Args:
        confusion: (K, K) counts (:func:`confusion_matrix`).
        k: how many pairs (fewer if fewer pairs were ever confused; zero counts are left out).
        class_names: optional names, added as ``"a_name"``/``"b_name"``.

    Returns:
        dicts ``{"a", "b", "count", "a_to_b", "b_to_a", "rate"}`` with ``a < b``, sorted by
        ``count`` (ties by ``(a, b)``); ``rate`` = count / (points of class a + of class b).
    """
    c = torch.as_tensor(confusion).long()
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"confusion must be square (K, K), got {tuple(c.shape)}")
    sym = c + c.T
    totals = c.sum(1)
    pairs = []
    kk = c.shape[0]
    for a in range(kk):
        for b in range(a + 1, kk):
            cnt = int(sym[a, b])
            if cnt > 0:
                denom = int(totals[a] + totals[b])
                entry = {"a": a, "b": b, "count": cnt, "a_to_b": int(c[a, b]), "b_to_a": int(c[b, a]),
                         "rate": cnt / denom if denom else 0.0}
                if class_names is not None:
                    entry["a_name"], entry["b_name"] = class_names[a], class_names[b]
                pairs.append(entry)
    pairs.sort(key=lambda p: (-p["count"], p["a"], p["b"]))
    return pairs[:k]


def _check_labels(t: Tensor, num_classes: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes}), got [{int(t.min())}, {int(t.max())}]")


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(1)


def predict_under_attack(
    model: nn.Module,
    data: Any,
    attack: Callable[[nn.Module, Tensor, Tensor], Tensor] | None,
    n: int | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(labels, clean_pred, adv_pred)`` (each int64 (N,)) of ``model`` on the first ``n`` points.

    Only clean-correct points are attacked (AutoAttack convention); the others keep their clean
    prediction. ``attack=None`` gives ``adv_pred == clean_pred``. The model runs in eval mode;
    modes are restored.
    """
    x_all, y_all, is_uint8 = _as_tensors(data, n)
    device = model_device(model, device)
    clean = torch.empty(len(y_all), dtype=torch.long)
    adv = torch.empty(len(y_all), dtype=torch.long)
    with eval_mode(model):
        for idx in torch.arange(len(y_all)).split(batch_size):
            xb = x_all[idx].to(device)
            xb = xb.float().div_(255) if is_uint8 else xb.float()
            yb = y_all[idx].to(device)
            pc = _predict(model, xb)
            pa = pc.clone()
            ok = pc == yb
            if attack is not None and bool(ok.any()):
                pa[ok] = _predict(model, attack(model, xb[ok], yb[ok]))
            clean[idx], adv[idx] = pc.cpu(), pa.cpu()
    return y_all.clone(), clean, adv


@dataclass
class ClassReport:
    """Per-class clean / robust accuracy, the confusion under attack and the hardest pairs.

    Attributes:
        num_classes: K.
        clean: per-class clean accuracy (K,).
        robust: per-class accuracy under the attack (K,).
        confusion: (K, K) counts of true class -> prediction under attack.
        pairs: :func:`hardest_pairs` of ``confusion``.
        class_names: names, if known.
        support: points per class (K,).
    """

    num_classes: int
    clean: Tensor
    robust: Tensor
    confusion: Tensor
    pairs: list[dict[str, Any]]
    support: Tensor
    class_names: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (lists; NaN accuracies of absent classes become ``None``)."""

        def clean_list(t: Tensor) -> list[float | None]:
            return [None if v != v else float(v) for v in t.tolist()]

        return {
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "support": self.support.tolist(),
            "clean": clean_list(self.clean),
            "robust": clean_list(self.robust),
            "confusion": self.confusion.tolist(),
            "hardest_pairs": self.pairs,
        }


def class_report(
    labels: Tensor, clean_pred: Tensor, adv_pred: Tensor, num_classes: int, k: int = 5,
    class_names: Sequence[str] | None = None,
) -> ClassReport:
    """All per-class analytics from labels and predictions (e.g. from :func:`predict_under_attack`
    or a :class:`~aal.eval.suite.SuiteResult`'s ``labels`` and ``pred``).

    Example:
        >>> import torch
        >>> r = class_report(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1, 1]), 2)
        >>> r.to_dict()["robust"], r.to_dict()["hardest_pairs"][0]["count"]
        ([0.0, 1.0], 1)
    """
    labels = torch.as_tensor(labels).long()
    clean_pred, adv_pred = torch.as_tensor(clean_pred).long(), torch.as_tensor(adv_pred).long()
    conf = confusion_matrix(labels, adv_pred, num_classes)
    return ClassReport(
        num_classes=num_classes,
        clean=per_class_accuracy(clean_pred == labels, labels, num_classes),
        robust=per_class_accuracy(adv_pred == labels, labels, num_classes),
        confusion=conf,
        pairs=hardest_pairs(conf, k=k, class_names=class_names),
        support=torch.bincount(labels, minlength=num_classes),
        class_names=list(class_names) if class_names is not None else None,
    )


__all__ = [
    "ClassReport",
    "class_report",
    "confusion_matrix",
    "hardest_pairs",
    "per_class_accuracy",
    "predict_under_attack",
]
