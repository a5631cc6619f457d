"""A worked example of the differentiable cross (C-PIC): classify 3-D volumes from a small fraction of their voxels.

Each volume ``V (s, s, s)`` (s a power of 2) holds a smooth random background and noise; half of them also hold a
small bright Gaussian blob at a random place. A patch encoder ``φ_θ`` maps the voxel and its six neighbours to a
number, which defines the *feature tensor* ``F_θ[i, j, k] = φ_θ(patch of V at (i, j, k))``, quantized into
``3 log₂ s`` modes of size 2 (:class:`~lowrankopt.cross.Quantization`, interleaved). Nobody forms F:
:func:`~lowrankopt.cross.tt_cross` picks the fibers of a rank-r cross approximation of F (on the detached encoder;
maxvol steers the fibers to the largest features — the cherry-picking), refreshed every few steps, and each training
step rebuilds the TT from those fibers with :func:`~lowrankopt.cross.cross_forward`, so the loss reaches θ through
the encoder's values on just those patches. A small classifier reads summaries of the TT that do not depend on its
gauge: its mean over the whole volume (from the cores, O(d n r²)) and the largest and mean feature on the pivot's
fibers. Encoder, cross and classifier train end to end with Adam; the fraction of voxels ever read — the union of
all patches the encoder saw, in training and in testing — is reported next to the test accuracy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cross import CrossInfo, Quantization, cross_forward, tt_cross
from ..formats.tt import TensorTrain

__all__ = ["CPICConfig", "make_volumes", "PatchEncoder", "train_cpic"]


@dataclass(frozen=True)
class CPICConfig:
    """Sizes of the worked example. ``size``: voxels per side (a power of 2); ``train``, ``test``: volumes;
    ``rank``: TT rank of the cross; ``sweeps``: of each fiber selection (warm-started in training, from a random start
    on a test volume); ``steps``: Adam steps on the whole training set (learning rates ``lr`` for the encoder,
    ``classifier_lr`` for the classifier); ``refresh``: steps between re-selections of the fibers; ``sigma``,
    ``contrast``: width and height of the blob; ``background``, ``noise``: amplitudes of the smooth background and of
    the noise."""

    size: int = 32
    train: int = 32
    test: int = 64
    rank: int = 3
    sweeps: int = 3
    steps: int = 150
    refresh: int = 20
    lr: float = 0.005
    classifier_lr: float = 0.3
    sigma: float = 3.0
    contrast: float = 1.0
    background: float = 0.3
    noise: float = 0.2


def make_volumes(n: int, config: CPICConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` volumes ``(n, s, s, s)`` (float64) and labels ``(n,)``: a smooth background (the mean of three random
    low-frequency cosines) plus Gaussian noise, and in every other volume a Gaussian blob at a random place."""
    c, size = config, config.size
    x = torch.arange(size, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(x, x, x, indexing="ij"), -1)
    volumes = torch.empty(n, size, size, size, dtype=torch.float64)
    labels = torch.arange(n) % 2
    for v in range(n):
        freq = torch.rand(3, 3, dtype=torch.float64, generator=generator) * 2 * math.pi / size
        phase = torch.rand(3, dtype=torch.float64, generator=generator) * 2 * math.pi
        volumes[v] = c.background * torch.cos(grid @ freq + phase).mean(-1)
        volumes[v] += c.noise * torch.randn(size, size, size, dtype=torch.float64, generator=generator)
        if labels[v]:
            margin = 2 * c.sigma
            center = margin + torch.rand(3, dtype=torch.float64, generator=generator) * (size - 2 * margin)
            volumes[v] += c.contrast * torch.exp(-(grid - center).square().sum(-1) / (2 * c.sigma**2))
    return volumes, labels


class PatchEncoder(nn.Module):
    """``φ_θ``: a voxel and its six face neighbours (edge-padded) → a number, by a two-layer MLP."""

    def __init__(self, hidden: int = 16, *, mean_start: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(7, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        if mean_start:  # start near tanh(patch mean): a smoothing prior, so the first crosses find bright spots
            with torch.no_grad():
                for layer in (self.net[0], self.net[2]):
                    layer.weight.normal_(0, 0.1, generator=generator)
                    layer.bias.zero_()
                self.net[0].weight[0] = 1 / 7
                self.net[2].weight[0, 0] = 1.0
        offsets = torch.cat(
            [torch.zeros(1, 3, dtype=torch.long), torch.eye(3, dtype=torch.long), -torch.eye(3, dtype=torch.long)]
        )
        self.register_buffer("offsets", offsets, persistent=False)

    def patches(self, index: torch.Tensor, size: int) -> torch.Tensor:
        """The voxel indices ``(N, 7, 3)`` of the patches around ``index (N, 3)``, clamped at the border."""
        return (index[:, None, :] + self.offsets).clamp(0, size - 1)

    def forward(self, volume: torch.Tensor, index: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """φ_θ at the voxels ``index (N, 3)`` of ``volume (s, s, s)`` → ``(N,)``; marks the voxels read in ``seen``."""
        p = self.patches(index, volume.shape[0])
        if seen is not None:
            seen[p[..., 0], p[..., 1], p[..., 2]] = True
        values = volume[p[..., 0], p[..., 1], p[..., 2]].to(self.net[0].weight.dtype)
        return self.net(values)[:, 0]


class Classifier(nn.Module):
    """Logistic regression on summaries of the feature TT that do not depend on its gauge: its mean over the volume
    (from all cores) and the largest and the mean feature on the fibers at the pivot."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 1)

    @staticmethod
    def summaries(Y: TensorTrain, pivot: int) -> torch.Tensor:
        size = math.prod(Y.shape)
        total = Y.cores[0].sum(1)
        for core in Y.cores[1:]:
            total = total @ core.sum(1)
        block = Y.cores[pivot]
        return torch.stack([total.reshape(()) / size, block.max(), block.mean()])

    def forward(self, Y: TensorTrain, pivot: int) -> torch.Tensor:
        return self.net(self.summaries(Y, pivot))[0]


class _Volume:
    """One volume seen through the quantized index map, with the voxels the encoder has read."""

    def __init__(self, volume: torch.Tensor, quantization: Quantization):
        self.volume, self.q = volume, quantization
        self.seen = torch.zeros(volume.shape, dtype=torch.bool)
        self.tt: TensorTrain | None = None
        self.info: CrossInfo | None = None

    def features(self, encoder: PatchEncoder):
        return lambda index: encoder(self.volume, self.q.to_array(index), self.seen)

    def select_fibers(self, encoder: PatchEncoder, sweeps: int, config: CPICConfig, generator: torch.Generator) -> None:
        """Fibers of a rank-r cross of the current (detached) features, warm-started from the last TT."""
        features = self.features(encoder)

        def detached(index):
            with torch.no_grad():
                return features(index)

        init = self.tt if self.tt is not None else config.rank
        self.tt, self.info = tt_cross(
            detached, self.q.shape, nswp=sweeps, init=init, rank_increase=0, generator=generator
        )

    def logit(self, encoder: PatchEncoder, classifier: Classifier) -> torch.Tensor:
        Y = cross_forward(self.info, self.features(encoder))
        self.tt = TensorTrain._trusted([core.detach() for core in Y.cores])
        return classifier(Y, self.info.pivot)


def train_cpic(config: CPICConfig = CPICConfig(), *, seed: int = 0) -> dict:
    """Train encoder + cross + classifier on generated volumes; returns the accuracies, the fractions of voxels read,
    the loss history and the time."""
    with torch.random.fork_rng(devices=[]):  # nn.Linear draws its start from the global generator: seed it, then
        torch.manual_seed(seed)  # give the caller's global state back
        return _train(config, seed)


def _train(config: CPICConfig, seed: int) -> dict:
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    q = Quantization((config.size,) * 3, order="interleaved")
    train_x, train_y = make_volumes(config.train, config, g)
    test_x, test_y = make_volumes(config.test, config, g)
    train = [_Volume(v, q) for v in train_x]
    test = [_Volume(v, q) for v in test_x]
    encoder, classifier = PatchEncoder(generator=g).double(), Classifier().double()
    optimizer = torch.optim.Adam(
        [{"params": encoder.parameters()}, {"params": classifier.parameters(), "lr": config.classifier_lr}],
        lr=config.lr,
    )
    losses = []
    for step in range(config.steps):
        if step % config.refresh == 0:  # re-pick the fibers where the current features are largest
            for volume in train:
                volume.select_fibers(encoder, config.sweeps, config, g)
        optimizer.zero_grad()
        logits = torch.stack([volume.logit(encoder, classifier) for volume in train])
        loss = F.binary_cross_entropy_with_logits(logits, train_y.double())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    def accuracy(volumes, labels) -> float:
        with torch.no_grad():
            for volume in volumes:
                if volume.info is None:  # a test volume: pick its fibers with the trained encoder
                    volume.select_fibers(encoder, config.sweeps, config, g)
            logits = torch.stack([volume.logit(encoder, classifier) for volume in volumes])
        return ((logits > 0).long() == labels).double().mean().item()

    return {
        "train_accuracy": accuracy(train, train_y),
        "test_accuracy": accuracy(test, test_y),
        "train_fraction_read": torch.stack([v.seen for v in train]).double().mean().item(),
        "test_fraction_read": torch.stack([v.seen for v in test]).double().mean().item(),
        "fiber_entries": train[0].info.fiber_entries,
        "voxels": config.size**3,
        "losses": losses,
        "seconds": time.perf_counter() - start,
    }


def dense_reference(config: CPICConfig = CPICConfig(), *, seed: int = 0) -> float:
    """Test accuracy of a classifier that reads every voxel: logistic regression on the largest 7-voxel mean of each
    volume (the same volumes as :func:`train_cpic` with the same seed)."""
    g = torch.Generator().manual_seed(seed)
    train_x, train_y = make_volumes(config.train, config, g)
    test_x, test_y = make_volumes(config.test, config, g)

    def largest_mean(volumes):
        stencil = torch.zeros(1, 1, 3, 3, 3, dtype=volumes.dtype)
        stencil[0, 0, 1, 1, :] = stencil[0, 0, 1, :, 1] = stencil[0, 0, :, 1, 1] = 1 / 7
        means = F.conv3d(F.pad(volumes[:, None], (1,) * 6, mode="replicate"), stencil)
        return means.flatten(1).max(1).values

    x, y = largest_mean(train_x), train_y.double()
    mu, sd = x.mean(), x.std()
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(w[0] * (x - mu) / sd + w[1], y)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        logits = w[0] * (largest_mean(test_x) - mu) / sd + w[1]
    return ((logits > 0).long() == test_y).double().mean().item()
