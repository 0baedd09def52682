"""Contract tests for every registered model (timm-style), plus architecture reference checks.

Every name in ``MODELS`` is exercised by the contract tests; a model added later is covered
automatically with a (B,3,32,32) input unless ``CASES`` says otherwise.
"""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from torch import nn

import aal
from aal.attention import SpatialAttention
from aal.models import MODELS, create_model
from aal.models.base import Normalize
from aal.models.purifier import PIPELINE_MODELS

# purifiers (images -> images) and the AToP pipeline are not AttentionNets: tests/test_seed_methods.py
CLASSIFIERS = [
    n for n in MODELS.names()
    if n not in PIPELINE_MODELS and getattr(MODELS.get(n), "task", "classification") == "classification"
]

B = 2


pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (options, input (C,H,W), expected spatial size of the stem output / attention map).
# wide_resnet is tested at a small depth/width to stay fast; wrn34_10 covers the full-size path.
CASES: dict[str, tuple[dict, tuple[int, int, int], tuple[int, int]]] = {
    "small_cnn": ({}, (1, 28, 28), (24, 24)),
    "resnet12": ({}, (3, 32, 32), (32, 32)),  # stem="none": the map is at input resolution
    "wide_resnet": ({"depth": 16, "widen_factor": 2, "dropout": 0.3}, (3, 32, 32), (32, 32)),
}
# variants that change the stem, tested as extra cases
EXTRA = {
    "resnet18-imagenet": ("resnet18", {"stem": "imagenet"}, (3, 64, 64), (32, 32)),
    "resnet50-imagenet": ("resnet50", {"stem": "imagenet"}, (3, 64, 64), (32, 32)),
    "resnet12-conv": ("resnet12", {"stem": "conv"}, (3, 32, 32), (32, 32)),
}


def _all_cases() -> list:
    out = []
    for name in CLASSIFIERS:
        opts, shape, hw = CASES.get(name, ({}, (3, 32, 32), (32, 32)))
        out.append(pytest.param(name, opts, shape, hw, id=name))
    for case_id, (name, opts, shape, hw) in EXTRA.items():
        out.append(pytest.param(name, opts, shape, hw, id=case_id))
    return out


ALL = _all_cases()


def _input(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.rand(B, *shape, generator=torch.Generator().manual_seed(seed))


def _build(name: str, opts: dict, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **opts, **kwargs)


def test_registry_lists_the_zoo():
    expected = {"small_cnn", "preact_resnet18", "resnet18", "resnet34", "resnet50"}
    expected |= {"wrn34_10", "wide_resnet", "resnet12"}
    assert expected <= set(MODELS.names())
    for entry in MODELS.entries():
        assert entry.summary, f"{entry.name} needs a one-line docstring summary for `aal list`"


@pytest.mark.parametrize("name,opts,shape,hw", ALL)
def test_forward_backward_every_parameter_gets_a_finite_grad(name, opts, shape, hw):
    model = _build(name, opts, attention="cbam").train()
    x = _input(shape).requires_grad_(True)
    logits = model(x)
    assert logits.shape == (B, 10)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([1, 3])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name,opts,shape,hw", ALL)
def test_attention_map_and_override_for_one_call(name, opts, shape, hw):
    model = _build(name, opts, attention="cbam").eval()
    assert model.has_attention
    x = _input(shape)
    with torch.no_grad():
        logits, m = model(x, return_attention=True)
        assert m.shape == (B, 1, *hw)
        assert (m > 0).all() and (m < 1).all()
        # the map is the one the stem output is gated with
        assert m.shape[-2:] == model.stem(model.normalize(x)).shape[-2:]

        other = torch.rand(B, 1, *hw, generator=torch.Generator().manual_seed(1))
        logits_o, m_o = model(x, attention_map=other, return_attention=True)
        assert torch.equal(m_o, other)
        assert not torch.allclose(logits_o, logits)
        # the override affects exactly that one call
        torch.testing.assert_close(model(x), logits, rtol=0, atol=0)

        with pytest.raises(ValueError):
            model(x, attention_map=torch.rand(B, 1, hw[0] + 1, hw[1]))


@pytest.mark.parametrize("name,opts,shape,hw", ALL)
def test_without_attention_returns_no_map_and_refuses_override(name, opts, shape, hw):
    model = _build(name, opts).eval()
    assert not model.has_attention
    x = _input(shape)
    with torch.no_grad():
        logits, m = model(x, return_attention=True)
        assert m is None and logits.shape == (B, 10)
        with pytest.raises(ValueError):
            model(x, attention_map=torch.rand(B, 1, *hw))


@pytest.mark.parametrize("name,opts,shape,hw", ALL)
def test_feature_extractor(name, opts, shape, hw):
    model = _build(name, opts, num_classes=0).eval()
    assert isinstance(model.head, nn.Identity)
    with torch.no_grad():
        feats = model(_input(shape))
    assert feats.shape == (B, model.num_features)
    with_head = _build(name, opts, num_classes=7)
    assert with_head.head.in_features == with_head.num_features == model.num_features


@pytest.mark.parametrize("name,opts,shape,hw", ALL)
def test_normalization_lives_inside_the_model(name, opts, shape, hw):
    c = shape[0]
    mean = [0.3 + 0.1 * i for i in range(c)]
    std = [0.2 + 0.05 * i for i in range(c)]
    model = _build(name, opts, mean=mean, std=std, attention="cbam").eval()
    plain = copy.deepcopy(model)
    plain.normalize = Normalize([0.0] * c, [1.0] * c)
    x = _input(shape)
    manual = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(manual), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,opts,shape,hw", ALL)
def test_channels_last_matches_nchw(name, opts, shape, hw):
    ref = _build(name, opts, attention="cbam").eval()
    cl = _build(name, opts, attention="cbam", channels_last=True).eval()
    for p in cl.parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
    x = _input(shape)
    with torch.no_grad():
        expected, m_ref = ref(x, return_attention=True)
        got, m_cl = cl(x.contiguous(memory_format=torch.channels_last), return_attention=True)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(m_cl, m_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_mean_std_length_mismatch_raises(name):
    c = CASES.get(name, ({}, (3, 32, 32), None))[1][0]
    with pytest.raises(ValueError):
        create_model(name, mean=[0.5] * (c + 1), std=[0.5] * (c + 1))
    with pytest.raises(ValueError):
        create_model(name, mean=[0.5] * c, std=[0.5] * (c + 1))
    with pytest.raises(ValueError):
        create_model(name, num_classes=-1)


def test_spatial_attention_gradcheck_float64():
    torch.manual_seed(0)
    layer = SpatialAttention().double()
    h = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (h,))
    m = torch.rand(2, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, mm: layer(t, override=mm)[0], (h, m))


@pytest.mark.parametrize(
    "name,opts,shape",
    [
        ("resnet12", {"channels": (2, 3, 3, 4), "stem": "conv"}, (3, 16, 16)),
        ("wide_resnet", {"depth": 10, "widen_factor": 1}, (3, 8, 8)),
        ("preact_resnet18", {}, (3, 4, 4)),
    ],
)
def test_input_gradient_gradcheck_float64(name, opts, shape):
    # attacks differentiate the model w.r.t. its input (through the attention map too)
    model = _build(name, opts, attention="cbam", num_classes=3).double().eval()
    x = torch.rand(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # fast_mode checks random projections of the Jacobian: a few passes instead of one per pixel
    assert torch.autograd.gradcheck(model, (x.requires_grad_(True),), atol=1e-6, fast_mode=True)


@pytest.mark.parametrize(
    "name,kwargs,params",
    [
        # kuangliu/pytorch-cifar ResNet18 (CIFAR-10)
        ("resnet18", {}, 11_173_962),
        # Rice et al. / Wong et al. PreActResNet18 (final BN included)
        ("preact_resnet18", {}, 11_172_170),
        # TRADES / MART WideResNet-34-10
        ("wrn34_10", {}, 46_160_474),
        # WRN-28-10 (Zagoruyko & Komodakis)
        ("wide_resnet", {}, 36_479_194),
        # torchvision resnet18/34/50, 1000 classes
        ("resnet18", {"num_classes": 1000, "stem": "imagenet"}, 11_689_512),
        ("resnet34", {"num_classes": 1000, "stem": "imagenet"}, 21_797_672),
        ("resnet50", {"num_classes": 1000, "stem": "imagenet"}, 25_557_032),
        # MetaOptNet / RFS ResNet-12 feature extractor (64-160-320-640)
        ("resnet12", {"num_classes": 0}, 12_424_320),
    ],
)
def test_parameter_counts_match_the_reference_implementations(name, kwargs, params):
    model = create_model(name, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == params


def test_resnet12_feature_extractor_on_miniimagenet_size():
    model = create_model("resnet12", num_classes=0, attention="cbam").eval()
    with torch.no_grad():
        feats, m = model(torch.rand(2, 3, 84, 84), return_attention=True)
    assert feats.shape == (2, 640) and m.shape == (2, 1, 84, 84)
    assert isinstance(model.stem, nn.Identity)
    # the attention acts on the 3 image channels; with stem="conv" on 64 feature maps
    conv = create_model("resnet12", stem="conv")
    assert isinstance(conv.stem, nn.Conv2d) and conv.stem.out_channels == 64


def test_stem_is_the_first_convolution_only():
    for name, opts in [("resnet18", {}), ("resnet50", {"stem": "imagenet"}), ("preact_resnet18", {}), ("wrn34_10", {})]:
        model = create_model(name, **opts)
        assert isinstance(model.stem, nn.Conv2d), name
    imagenet = create_model("resnet18", stem="imagenet")
    assert imagenet.stem.kernel_size == (7, 7) and imagenet.stem.stride == (2, 2)
    assert isinstance(imagenet.trunk.maxpool, nn.MaxPool2d)
    cifar = create_model("resnet18")
    assert cifar.stem.kernel_size == (3, 3) and cifar.stem.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in cifar.modules())


def test_in_channels_option():
    model = create_model("resnet18", in_channels=1, mean=[0.5], std=[0.25]).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    assert create_model("small_cnn").stem.in_channels == 1
    assert create_model("wrn34_10").stem.in_channels == 3


def test_bad_options_raise():
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet18", stem="cifar10")
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet12", stem="identity")
    with pytest.raises(ValueError, match="depth"):
        create_model("wide_resnet", depth=30)
    with pytest.raises(ValueError):
        create_model("resnet12", channels=(64, 160, 320))
    with pytest.raises(TypeError):
        create_model("resnet18", widen_factor=2)  # an option of another model
    with pytest.raises(TypeError):
        create_model("small_cnn", stem="cifar")


def test_weight_init():
    torch.manual_seed(0)
    model = create_model("resnet18", attention="cbam")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    conv = model.trunk.layer3[0].conv2  # 256 -> 256, 3x3: Kaiming fan-out std sqrt(2 / (9 * 256))
    assert abs(conv.weight.std().item() / (2 / (9 * 256)) ** 0.5 - 1) < 0.05
    # the attention layer keeps its own init: a small map-producing conv, not Kaiming fan-out
    assert model.attention.conv.weight.abs().max() < 1 / (2 * 49) ** 0.5 + 1e-6
    zero = create_model("resnet50", zero_init_residual=True)
    assert torch.count_nonzero(zero.trunk.layer1[0].bn3.weight) == 0


def test_wide_resnet_dropout_is_active_in_train_mode_only():
    model = _build("wide_resnet", {"depth": 10, "widen_factor": 1, "dropout": 0.5})
    x = _input((3, 16, 16))
    with torch.no_grad():
        model.train()
        a, b = model(x), model(x)
        assert not torch.allclose(a, b)
        model.eval()
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_docstring_examples():
    from aal.models import base, resnet, resnet12, wrn, zoo

    for module in (base, resnet, resnet12, wrn, zoo, aal.models):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, f"doctest failed in {module.__name__}"


@pytest.mark.parametrize("name", ["preact_resnet18", "resnet18", "resnet34", "resnet50"])
def test_resnet_width_option_scales_every_stage(name):
    model = create_model(name, width=16, attention="cbam_in")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m is not model.attention.conv]
    assert model.stem.out_channels == 16
    expansion = 4 if name == "resnet50" else 1
    assert model.num_features == 8 * 16 * expansion
    assert max(c.out_channels for c in convs) == 8 * 16 * expansion
    logits, m = model(torch.rand(2, 3, 32, 32), return_attention=True)
    assert logits.shape == (2, 10) and m.shape == (2, 1, 32, 32)
    full = sum(p.numel() for p in create_model(name).parameters())
    small = sum(p.numel() for p in model.parameters())
    assert small < full / 10  # a quarter of the width: about 1/16 of the weights
    with pytest.raises(ValueError, match="width"):
        create_model(name, width=0)
