"""Adversarial purification (AToP, seed 002): purifiers, the random transform, and the defended pipeline.

Paper: Lin, Li, Zhang, Tanaka & Zhao, "Adversarial Training on Purification (AToP): Advancing
Both Robustness and Generalization", ICLR 2024 (arXiv 2401.16352); public facts in
``shared/seeds/README.md`` and the public code (github.com/glin2022/atop, notebooks
``Finetuning-AToP/*.ipynb``), re-implemented here.

The defence is one model, ``f(g(t(x)))``:

* ``t`` — :class:`RandomTransform` (RT): Gaussian noise of std ``noise_sigma`` (clipped to
  [0,1]), then random block masks: the image is cut into ``block_size`` x ``block_size`` blocks
  and a fraction ``missing_rate`` of them is replaced by ``fill``. Public code: sigma 0.25, 25%
  of 32-px blocks of 256-px images (an 8x8 grid), fill 0 in [-1,1] units (grey, 0.5 here), one
  mask per *batch*; here the default is one mask per *sample* (``mask_mode``), and for 28x28
  Fashion-MNIST the default block of 4 px gives a 7x7 grid. Fresh randomness at every call, in
  train *and* eval mode: the randomness is part of the defence, and an honest evaluation
  averages over it (EOT), which is the evaluator's job.
* ``g`` — the purifier: :class:`PurifierAE` (``purifier_ae``: a small convolutional
  auto-encoder) or :class:`PurifierUNet` (``purifier_unet``: a U-Net-style inpainting
  generator that also sees the hole mask, as DeepFill-v2 does in the public code). Images in
  [0,1] in and out (sigmoid output), same shape. No normalisation layers, so a purifier
  computes the same function in train and eval mode.
* ``f`` — a classifier, frozen: ``requires_grad=False`` on its parameters and kept in eval mode
  (BatchNorm statistics never move) by :class:`PurifiedClassifier`.

Gradients flow end to end (no BPDA, no ``no_grad``): an attack on a :class:`PurifiedClassifier`
differentiates through the classifier, the purifier and the transform (the noise is additive;
masked pixels and clipped pixels have zero gradient, which is the pipeline's true gradient).

Training through the one trainer (:mod:`aal.methods.atop`): ``atop_pretrain`` trains the
purifier to reconstruct ``x`` from ``t(x)``; ``atop_finetune`` adds ``lambda * CE`` of the
frozen classifier on purified adversarial examples. Both take a :class:`PurifiedClassifier` as
the model; the registered model ``atop`` builds one from configs::

    model: {name: atop, classifier_run: runs/standard, purifier: purifier_unet}

Example:
    >>> import torch, aal
    >>> from aal.models.purifier import PurifiedClassifier, RandomTransform
    >>> clf = aal.create_model("small_cnn")
    >>> g = aal.create_model("purifier_unet", in_channels=1, width=8)
    >>> defended = PurifiedClassifier(clf, g, RandomTransform(block_size=4, seed=0))
    >>> defended(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> any(p.requires_grad for p in defended.classifier.parameters())
    False
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aal.models import MODELS
from aal.models.base import Normalize
from aal.models.layers import check_choice, make_normalize
from aal.registry import Registry

MIX_MODES = ("disjoint", "independent")
"""How RT3 draws its ``mix`` transformed copies: one noise draw and non-overlapping masks (the
paper's Fig. 2b), or independent (noise, mask) draws (the public code's "mix number")."""

MASK_MODES = ("per_sample", "per_batch")
"""Block masks drawn independently per image (default) or one per batch (public AToP code)."""

PIPELINE_MODELS = frozenset({"purifier_ae", "purifier_unet", "atop"})
"""Registered models that are not :class:`~aal.models.AttentionNet` classifiers (purifiers map
images to images; ``atop`` is a purifier + frozen classifier pipeline). The AttentionNet contract
tests skip them; ``tests/test_seed_methods.py`` tests them."""


# ----------------------------------------------------------------------------- random transform
def _check_4d(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"RandomTransform expects images (B,C,H,W), got shape {tuple(x.shape)}")


class RandomTransform(nn.Module):
    """AToP's random transform ``t``: Gaussian noise, then random block masks.

    ``t(x) = fill * holes + (1 - holes) * clip(x + noise_sigma * N(0, 1), 0, 1)`` where ``holes``
    (B,1,H,W) in {0,1} marks ``floor(missing_rate * n_blocks)`` random blocks of
    ``block_size`` pixels (the last row/column of blocks is cropped when ``block_size`` does not
    divide the image).

    Args:
        noise_sigma: std of the Gaussian noise in [0,1] pixel units (>= 0; paper 0.25).
        missing_rate: fraction of blocks masked, in [0, 1) (paper 0.25).
        block_size: block side in pixels (>= 1).
        fill: value written into masked blocks, in [0,1].
        mask_mode: ``"per_sample"`` or ``"per_batch"``.
        clip: clip the noisy image to [0,1] (public code: yes).
        seed: ``None`` (default) draws from the global torch RNG (seeded and checkpointed by the
            trainer); an int gives the transform its own generator, seeded once and advanced by
            every call, so a sequence of calls is repeatable (:meth:`reseed` restarts it). The
            randomness is never switched off by ``eval()``.

    Returns (forward):
        ``(x_t, holes)``: the transformed images (B,C,H,W) in [0,1] and the hole mask (B,1,H,W).

    Example:
        >>> t = RandomTransform(noise_sigma=0.0, missing_rate=0.25, block_size=7, seed=0)
        >>> x_t, holes = t(torch.rand(3, 1, 28, 28))
        >>> holes.mean((1, 2, 3)).tolist()   # 4 of 16 blocks per image
        [0.25, 0.25, 0.25]
    """

    def __init__(
        self,
        noise_sigma: float = 0.25,
        missing_rate: float = 0.25,
        block_size: int = 4,
        fill: float = 0.5,
        mask_mode: str = "per_sample",
        clip: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not (math.isfinite(noise_sigma) and noise_sigma >= 0):
            raise ValueError(f"noise_sigma must be a finite number >= 0, got {noise_sigma!r}")
        if not (0.0 <= missing_rate < 1.0):
            raise ValueError(f"missing_rate must lie in [0, 1), got {missing_rate!r}")
        if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if not (0.0 <= fill <= 1.0):
            raise ValueError(f"fill must lie in [0, 1], got {fill!r}")
        self.noise_sigma, self.missing_rate, self.block_size = float(noise_sigma), float(missing_rate), int(block_size)
        self.fill, self.clip = float(fill), bool(clip)
        self.mask_mode = check_choice("mask_mode", mask_mode, MASK_MODES)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def reseed(self, seed: int | None = None) -> None:
        """Restart the private generator(s) from ``seed`` (default: the constructor's seed)."""
        if seed is not None:
            self.seed = int(seed)
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(int(self.seed))
            self._generators[device] = g
        return self._generators[device]

    def holes(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype, generator: torch.Generator | None = None) -> Tensor:
        """A random hole mask (B,1,H,W) in {0,1} for images of ``shape`` (B,C,H,W)."""
        return self.disjoint_holes(shape, 1, device, dtype, generator)[0]

    def disjoint_holes(
        self, shape: Sequence[int], k: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None = None
    ) -> Tensor:
        """``k`` hole masks (k,B,1,H,W) that never overlap, each with ``floor(missing_rate * n_blocks)`` blocks.

        One random order of the blocks is drawn (per sample or per batch, ``mask_mode``); mask
        ``i`` holds its ``i``-th chunk, so ``k = 1`` is exactly :meth:`holes`. Needs
        ``k * missing_rate <= 1``.
        """
        b, _, h, w = shape
        gh, gw = math.ceil(h / self.block_size), math.ceil(w / self.block_size)
        n = gh * gw
        m = int(self.missing_rate * n)
        if k * m > n:
            raise ValueError(f"{k} non-overlapping masks of {m} blocks do not fit in {n} blocks (lower mix or missing_rate)")
        rows = b if self.mask_mode == "per_sample" else 1
        if m == 0:
            return torch.zeros(k, b, 1, h, w, device=device, dtype=dtype)
        order = torch.rand(rows, n, generator=generator, device=device).argsort(dim=1)
        masks = []
        for i in range(k):
            grid = torch.zeros(rows, n, device=device, dtype=dtype).scatter_(1, order[:, i * m : (i + 1) * m], 1.0)
            grid = grid.view(rows, 1, gh, gw).repeat_interleave(self.block_size, 2).repeat_interleave(self.block_size, 3)
            masks.append(grid[..., :h, :w].expand(b, 1, h, w))
        return torch.stack(masks).contiguous()

    def _noisy(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        if self.noise_sigma > 0:
            x = x + self.noise_sigma * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
            if self.clip:
                x = x.clamp(0.0, 1.0)
        return x

    def sample(self, x: Tensor, k: int = 1, mix_mode: str = "disjoint") -> tuple[Tensor, Tensor]:
        """``k`` transformed copies of ``x`` (k,B,C,H,W) and their hole masks (k,B,1,H,W) (RT3).

        ``mix_mode="disjoint"``: one noise draw and ``k`` non-overlapping masks (the paper's
        Fig. 2b: "the noisy image is covered randomly by N non-overlapping masks");
        ``"independent"``: ``k`` independent (noise, mask) draws (the public code's "mix number"
        notebook). With ``k = 1`` both are :meth:`forward` exactly (same random draws, in order).
        """
        _check_4d(x)
        check_choice("mix_mode", mix_mode, MIX_MODES)
        g = self._generator(x.device)
        if mix_mode == "disjoint":
            noisy = self._noisy(x, g).unsqueeze(0)
            holes = self.disjoint_holes(x.shape, k, x.device, x.dtype, g)
        else:
            noisy_draws, hole_draws = [], []
            for _ in range(k):  # noise then mask per draw: the order forward() draws them in
                noisy_draws.append(self._noisy(x, g))
                hole_draws.append(self.holes(x.shape, x.device, x.dtype, g))
            noisy, holes = torch.stack(noisy_draws), torch.stack(hole_draws)
        return noisy * (1.0 - holes) + self.fill * holes, holes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_4d(x)
        g = self._generator(x.device)
        x = self._noisy(x, g)
        holes = self.holes(x.shape, x.device, x.dtype, g)
        return x * (1.0 - holes) + self.fill * holes, holes

    def extra_repr(self) -> str:
        return (
            f"noise_sigma={self.noise_sigma}, missing_rate={self.missing_rate}, block_size={self.block_size}, "
            f"fill={self.fill}, mask_mode={self.mask_mode!r}, clip={self.clip}, seed={self.seed}"
        )


# ----------------------------------------------------------------------------- purifiers
def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(inplace=True))


class _Purifier(nn.Module):
    """Shared input/output handling: normalisation, optional hole-mask channel, output in [0,1].

    With ``residual`` the network predicts a correction in logit space,
    ``sigmoid(logit(x) + out)``, and its last convolution starts near zero (N(0, 1e-3), not 0, so
    every layer gets a gradient from the first step): an untrained purifier is about the
    identity on its transformed input, and training starts from there. Without, the output is
    ``sigmoid(out)`` (DeepFill-style generators predict the image directly).
    """

    _LOGIT_EPS = 1e-3  # logit(x) of pixels clamped to [1e-3, 1 - 1e-3]: finite, within +-6.9

    def __init__(self, in_channels: int, mean, std, mask_input: bool, residual: bool) -> None:
        super().__init__()
        self.in_channels, self.mask_input, self.residual = int(in_channels), bool(mask_input), bool(residual)
        self.normalize = make_normalize(self.in_channels, mean, std)

    def _init_last(self, conv: nn.Conv2d) -> None:
        if self.residual:
            nn.init.normal_(conv.weight, std=1e-3)
            nn.init.zeros_(conv.bias)

    def _output(self, x: Tensor, out: Tensor) -> Tensor:
        if self.residual:
            out = out + torch.logit(x.clamp(self._LOGIT_EPS, 1 - self._LOGIT_EPS))
        return torch.sigmoid(out)

    def _input(self, x: Tensor, holes: Tensor | None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects (B,{self.in_channels},H,W) images, got {tuple(x.shape)}")
        h = self.normalize(x)
        if self.mask_input:
            m = torch.zeros_like(x[:, :1]) if holes is None else holes.to(x.dtype)
            h = torch.cat([h, m], 1)
        return h


class PurifierAE(_Purifier):
    """A small convolutional auto-encoder: 3 conv stages down (x1, /2, /4), 2 up, sigmoid output.

    Args:
        in_channels: image channels C.
        width: channels of the first stage (then 2x, 4x).
        mask_input: also feed the hole mask as an extra input channel.
        residual: predict a logit-space correction of the input, starting at the identity
            (default), instead of the image itself.
        mean, std: input normalisation inside the network (identity when ``None``).

    Shapes: (B,C,H,W) in [0,1] (and holes (B,1,H,W)) -> (B,C,H,W) in [0,1]; any H, W.
    """

    def __init__(
        self, in_channels: int = 3, width: int = 32, mask_input: bool = False, residual: bool = True, mean=None, std=None
    ) -> None:
        super().__init__(in_channels, mean, std, mask_input, residual)
        w, cin = int(width), self.in_channels + int(self.mask_input)
        self.enc1, self.enc2, self.enc3 = _conv(cin, w), _conv(w, 2 * w, 2), _conv(2 * w, 4 * w, 2)
        self.dec2, self.dec1 = _conv(4 * w, 2 * w), _conv(2 * w, w)
        self.out = nn.Conv2d(w, self.in_channels, 3, padding=1)
        self._init_last(self.out)

    def forward(self, x: Tensor, holes: Tensor | None = None) -> Tensor:
        h1 = self.enc1(self._input(x, holes))
        h2 = self.enc2(h1)
        h3 = self.enc3(h2)
        d2 = self.dec2(F.interpolate(h3, size=h2.shape[-2:], mode="nearest"))
        d1 = self.dec1(F.interpolate(d2, size=h1.shape[-2:], mode="nearest"))
        return self._output(x, self.out(d1))


class PurifierUNet(_Purifier):
    """A U-Net-style inpainting generator: double-conv blocks, ``levels`` downsamplings, skips.

    Args:
        in_channels: image channels C.
        width: channels at full resolution (doubled at every level).
        levels: number of 2x downsamplings (>= 1; 2 for 28x28 gives 28-14-7).
        mask_input: feed the hole mask as an extra input channel (default on, as the inpainting
            generator of the public code receives the mask).
        residual: predict a logit-space correction of the input, starting at the identity
            (default), instead of the image itself (DeepFill-style, ``False``).
        mean, std: input normalisation inside the network.

    Shapes: (B,C,H,W) in [0,1] (and holes (B,1,H,W)) -> (B,C,H,W) in [0,1]; any H, W.
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 32,
        levels: int = 2,
        mask_input: bool = True,
        residual: bool = True,
        mean=None,
        std=None,
    ) -> None:
        super().__init__(in_channels, mean, std, mask_input, residual)
        if isinstance(levels, bool) or int(levels) != levels or levels < 1:
            raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
        w, cin = int(width), self.in_channels + int(self.mask_input)
        chans = [w * 2**i for i in range(int(levels) + 1)]
        self.down = nn.ModuleList([nn.Sequential(_conv(cin, chans[0]), _conv(chans[0], chans[0]))])
        for i in range(1, len(chans)):
            self.down.append(nn.Sequential(_conv(chans[i - 1], chans[i], 2), _conv(chans[i], chans[i])))
        self.up = nn.ModuleList(
            [nn.Sequential(_conv(chans[i] + chans[i - 1], chans[i - 1]), _conv(chans[i - 1], chans[i - 1])) for i in range(len(chans) - 1, 0, -1)]
        )
        self.out = nn.Conv2d(chans[0], self.in_channels, 1)
        self._init_last(self.out)

    def forward(self, x: Tensor, holes: Tensor | None = None) -> Tensor:
        h = self._input(x, holes)
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
        h = skips.pop()
        for block in self.up:
            skip = skips.pop()
            h = block(torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1))
        return self._output(x, self.out(h))


def _purifier_args(num_classes: int, attention: str | None, in_channels: int | None) -> int:
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if attention not in (None, "none"):
        raise ValueError(f"purifiers have no attention slot; got attention={attention!r}")
    return 3 if in_channels is None else int(in_channels)


@MODELS.register("purifier_ae")
def purifier_ae(
    num_classes: int = 10,
    in_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
    *,
    width: int = 32,
    mask_input: bool = False,
    residual: bool = True,
) -> PurifierAE:
    """AToP purifier: small conv auto-encoder, images in [0,1] -> images in [0,1] (not a classifier).

    ``num_classes`` is accepted for the registry's common signature and ignored (a purifier
    outputs images); ``attention`` must be ``None``. Options: ``width``, ``mask_input``,
    ``residual``.
    """
    c = _purifier_args(num_classes, attention, in_channels)
    return PurifierAE(c, width=width, mask_input=mask_input, residual=residual, mean=mean, std=std)


@MODELS.register("purifier_unet")
def purifier_unet(
    num_classes: int = 10,
    in_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
    *,
    width: int = 32,
    levels: int = 2,
    mask_input: bool = True,
    residual: bool = True,
) -> PurifierUNet:
    """AToP purifier: U-Net inpainting generator (sees the hole mask), images -> images (not a classifier).

    ``num_classes`` is accepted for the registry's common signature and ignored; ``attention``
    must be ``None``. Options: ``width``, ``levels``, ``mask_input``, ``residual``.
    """
    c = _purifier_args(num_classes, attention, in_channels)
    return PurifierUNet(c, width=width, levels=levels, mask_input=mask_input, residual=residual, mean=mean, std=std)


# ----------------------------------------------------------------------------- the pipeline
class PurifiedClassifier(nn.Module):
    """The AToP defence as one model: ``classifier(purifier(transform(x)))``.

    Args:
        classifier: maps images in [0,1] to logits (B, K).
        purifier: ``purifier(x_t, holes) -> x_p`` (images in [0,1], same shape).
        transform: a :class:`RandomTransform` (or any module returning ``(x_t, holes)``);
            ``None`` for no transform (holes are then all zero).
        freeze_classifier: set ``requires_grad=False`` on the classifier's parameters and keep
            it in eval mode whatever ``train()`` is called with (default; AToP's classifier is
            frozen). With ``False`` the module is a plain composition.

    ``forward`` is fully differentiable w.r.t. ``x`` (attacks and evaluations see the whole
    pipeline) and random at every call when ``transform`` is random.

    Shapes: ``x`` (B,C,H,W) in [0,1] -> logits (B,K); :meth:`purify` -> (B,C,H,W).
    """

    def __init__(
        self,
        classifier: nn.Module,
        purifier: nn.Module,
        transform: nn.Module | None = None,
        freeze_classifier: bool = True,
        mix: int = 1,
        mix_mode: str = "disjoint",
    ) -> None:
        super().__init__()
        self.classifier, self.purifier, self.transform = classifier, purifier, transform
        self.freeze_classifier = bool(freeze_classifier)
        if isinstance(mix, bool) or int(mix) != mix or mix < 1:
            raise ValueError(f"mix must be an integer >= 1, got {mix!r}")
        self.mix, self.mix_mode = int(mix), check_choice("mix_mode", mix_mode, MIX_MODES)
        if self.mix > 1 and not hasattr(transform, "sample"):
            raise ValueError("mix > 1 (RT3) needs a transform with sample(x, k, mix_mode), e.g. RandomTransform")
        if self.mix_mode == "disjoint" and self.mix * getattr(transform, "missing_rate", 0.0) > 1:
            raise ValueError(f"mix={self.mix} non-overlapping masks of missing_rate {transform.missing_rate} exceed the image")
        self.num_classes = getattr(classifier, "num_classes", None)
        if self.freeze_classifier:
            classifier.requires_grad_(False)
            classifier.eval()

    def train(self, mode: bool = True) -> "PurifiedClassifier":
        super().train(mode)
        if self.freeze_classifier:
            self.classifier.eval()  # a frozen classifier's BatchNorm statistics never move
        return self

    def purify(self, x: Tensor) -> Tensor:
        """Purified images (B,C,H,W) in [0,1]: ``purifier(transform(x))`` (RT2), or RT3 with ``mix > 1``.

        RT3 (``mix = k`` transformed copies ``t_i(x)`` with holes ``m_i``, see
        :meth:`RandomTransform.sample`), combined by ``mix_mode``:

        * ``"disjoint"`` (paper, Fig. 2b): one noise draw, ``k`` non-overlapping masks, each copy
          purified; every pixel is taken from the copy that hid it, "the completed pixels are
          combined": ``sum_i m_i * g(t_i(x)) + (1 - sum_i m_i) * mean_i g(t_i(x))`` (the second
          term covers pixels no mask hid, when ``k * missing_rate < 1``). Costs ``k`` purifier passes.
        * ``"independent"`` (public code's "mix number" notebook): ``k`` independent (noise,
          mask) draws averaged at the input, one purifier pass: ``g(mean_i t_i(x), mean_i m_i)``.

        ``mix = 1`` is RT2 exactly in both modes (same draws, same arithmetic).
        """
        if self.transform is None:
            return self.purifier(x, torch.zeros_like(x[:, :1]))
        if not hasattr(self.transform, "sample"):  # a custom transform: one draw (RT2)
            x_t, holes = self.transform(x)
            return self.purifier(x_t, holes)
        x_t, holes = self.transform.sample(x, self.mix, self.mix_mode)
        if self.mix_mode == "independent":
            return self.purifier(x_t.mean(0), holes.mean(0))
        k, b = x_t.shape[:2]
        out = self.purifier(x_t.flatten(0, 1), holes.flatten(0, 1)).unflatten(0, (k, b))
        return (holes * out).sum(0) + (1.0 - holes.sum(0)) * out.mean(0)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.purify(x))


RUN_READERS: Registry[object] = Registry("run reader")
"""How the models read ``aal train`` run folders, registered by :mod:`aal.engine.run` (run folders
are the engine's; the models sit below it and get the readers passed in through this registry):
``"classifier"``: ``f(path, num_classes, in_channels) -> model`` in eval mode;
``"weights"``: ``f(path, model)`` loads the run's checkpoint into ``model`` (strict)."""


def build_atop_model(
    classifier: nn.Module | str | os.PathLike,
    purifier: nn.Module | str = "purifier_unet",
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    purifier_options: dict | None = None,
    purifier_run: str | os.PathLike | None = None,
    noise_sigma: float = 0.25,
    missing_rate: float = 0.25,
    block_size: int = 4,
    fill: float = 0.5,
    mask_mode: str = "per_sample",
    clip: bool = True,
    transform_seed: int | None = None,
    mix: int = 1,
    mix_mode: str = "disjoint",
) -> PurifiedClassifier:
    """Build the AToP defence ``classifier(purifier(transform(x)))`` with a frozen classifier.

    Args:
        classifier: a module, or the path of an ``aal train`` run folder / checkpoint holding it.
        purifier: a module, or a registered purifier name (``purifier_ae``, ``purifier_unet``).
        num_classes, in_channels: of the classifier's data (needed to build from a run without
            reading the dataset, and to build a purifier by name; ``in_channels`` default 3).
        purifier_options: keyword options of the named purifier (e.g. ``{"width": 16}``).
        purifier_run: initialise the purifier from a run trained with this same pipeline (e.g.
            the ``atop_pretrain`` stage); only its ``purifier.*`` weights are taken.
        noise_sigma, missing_rate, block_size, fill, mask_mode, clip, transform_seed: the
            :class:`RandomTransform`.
        mix, mix_mode: RT3 (``mix`` transformed copies, see :meth:`PurifiedClassifier.purify`);
            ``mix=1`` is RT2.

    Returns:
        a :class:`PurifiedClassifier` (train mode; the classifier frozen, in eval mode).

    Example:
        >>> import aal
        >>> m = build_atop_model(aal.create_model("small_cnn"), "purifier_ae", in_channels=1,
        ...                      purifier_options={"width": 8})
        >>> type(m.purifier).__name__, m.transform.missing_rate
        ('PurifierAE', 0.25)
    """
    from aal.models import create_model

    if not isinstance(classifier, nn.Module):
        classifier = RUN_READERS.create("classifier", classifier, num_classes, in_channels)
    if in_channels is None:  # the classifier's own normalisation knows its channels
        norm = getattr(classifier, "normalize", None)
        in_channels = int(norm.mean.shape[1]) if isinstance(norm, Normalize) else 3
    if isinstance(purifier, str):
        if purifier not in ("purifier_ae", "purifier_unet"):
            raise ValueError(f"purifier must be 'purifier_ae' or 'purifier_unet' (or a module), got {purifier!r}")
        purifier = create_model(purifier, in_channels=int(in_channels), **(purifier_options or {}))
    elif purifier_options:
        raise ValueError("purifier_options only apply to a purifier given by name")
    transform = RandomTransform(noise_sigma, missing_rate, block_size, fill, mask_mode, clip, transform_seed)
    model = PurifiedClassifier(classifier, purifier, transform, freeze_classifier=True, mix=mix, mix_mode=mix_mode)
    if purifier_run:
        stage1 = copy.deepcopy(model)
        RUN_READERS.create("weights", purifier_run, stage1)  # strict: the stage-1 run must be this same pipeline
        model.purifier.load_state_dict(stage1.purifier.state_dict())
    return model.train()


@MODELS.register("atop")
def atop(
    num_classes: int = 10,
    in_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
    *,
    classifier_run: str = "",
    classifier: str = "small_cnn",
    purifier: str = "purifier_unet",
    purifier_width: int = 32,
    purifier_run: str = "",
    noise_sigma: float = 0.25,
    missing_rate: float = 0.25,
    block_size: int = 4,
    fill: float = 0.5,
    mask_mode: str = "per_sample",
    clip: bool = True,
    transform_seed: int | None = None,
    mix: int = 1,
    mix_mode: str = "disjoint",
) -> PurifiedClassifier:
    """AToP defence: frozen classifier behind a purifier and a random transform (seed 002).

    The model a config names to train or evaluate AToP::

        model: {name: atop, classifier_run: runs/standard, purifier: purifier_unet}

    Options:
        classifier_run: run folder (or checkpoint) of the trained classifier to defend. Empty:
            a *fresh, random* ``classifier`` architecture is built (with a warning) — only useful
            for tests, or when a checkpoint of the whole pipeline is loaded afterwards.
        classifier: architecture used when ``classifier_run`` is empty (``mean``, ``std`` and
            ``attention`` go to it; with a run, its own config decides them).
        purifier: ``purifier_ae`` or ``purifier_unet``; ``purifier_width`` its width.
        purifier_run: run folder of the ``atop_pretrain`` stage whose purifier weights start
            the fine-tuning stage.
        noise_sigma, missing_rate, block_size, fill, mask_mode, clip, transform_seed: the
            random transform (:class:`RandomTransform`).
        mix, mix_mode: RT3, ``mix`` transformed copies combined by ``mix_mode``
            (:meth:`PurifiedClassifier.purify`); ``mix=1`` (default) is RT2.
    """
    from aal.models import create_model

    if purifier not in ("purifier_ae", "purifier_unet"):
        raise ValueError(f"purifier must be 'purifier_ae' or 'purifier_unet', got {purifier!r}")
    if classifier_run and attention not in (None, "none"):
        raise ValueError("atop: with classifier_run the classifier's architecture (attention included) comes from that run")
    # Config validation builds every model once on the meta device to check option values: the
    # runs named here need not exist yet then (nothing is read), and a stand-in classifier is used.
    dry_run = torch.get_default_device().type == "meta"
    if dry_run:
        classifier_run = purifier_run = ""
    if classifier_run:
        clf: nn.Module | str = classifier_run
    else:
        if not dry_run:
            warnings.warn("atop: no classifier_run given: the frozen classifier is randomly initialised", stacklevel=2)
        clf = create_model(classifier, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, attention=attention)
    return build_atop_model(
        clf, purifier, num_classes=num_classes, in_channels=in_channels, purifier_options={"width": purifier_width},
        purifier_run=purifier_run or None, noise_sigma=noise_sigma, missing_rate=missing_rate, block_size=block_size,
        fill=fill, mask_mode=mask_mode, clip=clip, transform_seed=transform_seed, mix=mix, mix_mode=mix_mode,
    )


__all__ = [
    "MIX_MODES",
    "MASK_MODES",
    "PIPELINE_MODELS",
    "PurifiedClassifier",
    "PurifierAE",
    "PurifierUNet",
    "RandomTransform",
    "atop",
    "build_atop_model",
    "RUN_READERS",
    "purifier_ae",
    "purifier_unet",
]
