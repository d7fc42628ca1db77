"""How predict splits the machine by default (inference.default_split): from the cores at hand."""

from __future__ import annotations

import os

import pytest
import torch

from pneumobatch.inference import available_cores, default_split


def test_available_cores_is_the_affinity_mask():
    assert available_cores() == len(os.sched_getaffinity(0)) >= 1


@pytest.mark.parametrize("cores, workers, threads", [(1, 1, 1), (2, 1, 1), (4, 2, 2), (16, 8, 8), (3, 1, 2)])
def test_cpu_splits_the_cores_between_decoding_and_the_network(cores: int, workers: int, threads: int):
    split = default_split(torch.device("cpu"), cores)
    assert (split.workers, split.threads, split.batch_size) == (workers, threads, 16)
    assert split.workers + split.threads <= max(cores, 2)  # never more busy processes than cores (one core: 2)


@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 1), (16, 15)])
def test_cuda_decodes_on_every_core_but_one_with_larger_batches(cores: int, workers: int):
    split = default_split(torch.device("cuda"), cores)
    assert (split.workers, split.threads, split.batch_size) == (workers, 1, 64)


def test_default_is_taken_from_this_machine():
    assert default_split(torch.device("cpu")) == default_split(torch.device("cpu"), available_cores())
