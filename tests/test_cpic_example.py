"""The differentiable-cross worked example: end-to-end training beats chance while reading a small share of voxels."""

import torch

from lowrankopt.benchmarks.cpic import CPICConfig, PatchEncoder, make_volumes, train_cpic


def test_volumes_have_the_blob_in_every_other_one():
    config = CPICConfig(size=16, sigma=2.0, noise=0.0, background=0.0)
    volumes, labels = make_volumes(4, config, torch.Generator().manual_seed(0))
    assert labels.tolist() == [0, 1, 0, 1]
    peaks = volumes.flatten(1).max(1).values
    assert torch.all(peaks[labels == 0] == 0) and torch.all(peaks[labels == 1] > 0.5)


def test_encoder_reads_the_stencil_and_marks_it():
    encoder = PatchEncoder(generator=torch.Generator().manual_seed(0)).double()
    volume = torch.zeros(8, 8, 8, dtype=torch.float64)
    seen = torch.zeros(8, 8, 8, dtype=torch.bool)
    encoder(volume, torch.tensor([[0, 4, 7]]), seen)
    assert int(seen.sum()) == 5  # the voxel and four in-range neighbours (two fall outside and are clamped onto it)
    assert seen[0, 4, 7] and seen[1, 4, 7] and seen[0, 3, 7] and seen[0, 5, 7] and seen[0, 4, 6]


def test_end_to_end_training_beats_chance_reading_few_voxels():
    result = train_cpic(CPICConfig(train=16, test=32, steps=60), seed=0)
    assert result["test_accuracy"] >= 0.7  # chance is 0.5; 23 of 32 right has probability 0.01 under chance
    assert result["test_fraction_read"] < 0.1
    assert result["losses"][-1] < result["losses"][0]
