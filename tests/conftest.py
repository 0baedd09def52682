"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


class Noisy(nn.Module):
    """A purification-style randomised model: Gaussian noise on the input, then the network."""

    def __init__(self, net: nn.Module, sigma: float = 0.1) -> None:
        super().__init__()
        self.net, self.sigma = net, sigma

    def forward(self, x):
        return self.net((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    The tests' tensors are tiny: measured here, with other jobs on the 2 cores torch's two
    intra-op threads wait on each other (a gradcheck file took 265 s instead of 17 s, a training
    fixture ran 10x slower); one thread costs little on an idle machine at these sizes. The
    previous count is restored after the module.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def fmnist_small_cnn():
    """``(model, test split)``: the small CNN after 200 SGD steps (batch 128, lr 0.05, momentum 0.9)
    of standard training on the first Fashion-MNIST training images, in eval mode.

    Shared by the evaluation tests (suite, checks): a real, non-robust model that trains in a few
    seconds. Tests must not modify it (attacks restore the model's state). Skips without the data.
    """
    if not FMNIST.exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    import aal
    from aal.data import load_data

    bundle = load_data("fashion_mnist")
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = aal.create_model("small_cnn", mean=bundle.info.mean, std=bundle.info.std)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x, y = bundle.train.images[: 200 * 128].float().div(255), bundle.train.labels[: 200 * 128]
        model.train()
        for xb, yb in zip(x.split(128), y.split(128)):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(n_threads)
    return model.eval(), bundle.test
