"""Which test examples are evaluated, in which order, and which demonstrations each one gets.

Random demonstrations make the same draws as OpenFlamingo's evaluation for the same seed (its
``utils.prepare_eval_samples``, ``get_query_set`` and ``sample_batch_demos_from_query_set``), with
private generators instead of the global ones:

1. NumPy's Mersenne Twister seeded with ``seed`` picks the evaluated subset (``num_samples`` test
   indices without replacement), then, continuing, the query set (``query_set_size`` training
   indices without replacement).
2. The subset is visited in the order of a single-process ``DistributedSampler`` (shuffled by
   ``torch.randperm`` under a generator seeded 0), in batches of ``batch_size``.
3. Python's ``random`` seeded with ``seed`` then draws each query's demonstrations with
   ``sample(query_set, shots)``, query after query, batch after batch.

``ClassBalancedDemonstrations`` instead draws K examples of every class (N-way K-shot episodes).

RICES (Yang et al., 2022) instead takes the training examples whose image features are most
similar (cosine) to the query's, most similar last, as OpenFlamingo's ``rices.py`` orders them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch


def evaluation_order(num_test: int, num_samples: int, seed: int) -> tuple[list[int], np.random.RandomState]:
    """(test indices in the order they are evaluated, the NumPy generator after drawing them)."""
    numpy_rng = np.random.RandomState(seed)
    count = num_test if num_samples is None or num_samples <= 0 else num_samples
    if count > num_test:
        raise ValueError(f"num_samples ({count}) is more than the {num_test} test examples")
    chosen = numpy_rng.choice(num_test, count, replace=False)
    generator = torch.Generator().manual_seed(0)  # DistributedSampler's default seed, epoch 0
    order = torch.randperm(count, generator=generator).tolist()
    return [int(chosen[i]) for i in order], numpy_rng


def batches(indices: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(indices), batch_size):
        yield list(indices[start : start + batch_size])


class RandomDemonstrations:
    """Demonstrations drawn at random from a fixed query set of the training examples.

    Args:
        train: the training examples.
        query_set_size: how many training examples the demonstrations are drawn from (all, if more).
        numpy_rng: the NumPy generator ``evaluation_order`` returned (the query set continues its draws).
        seed: seeds Python's ``random`` for the per-query draws.
    """

    def __init__(self, train: Sequence[dict], query_set_size: int, numpy_rng: np.random.RandomState, seed: int):
        size = min(query_set_size, len(train))
        self.query_set = [train[i] for i in numpy_rng.choice(len(train), size, replace=False)]
        self.rng = random.Random(seed)

    def __call__(self, queries: Sequence[dict], shots: int) -> list[list[dict]]:
        if shots > len(self.query_set):
            raise ValueError(f"{shots} demonstrations asked for but the query set holds {len(self.query_set)}")
        return [self.rng.sample(self.query_set, shots) for _ in queries]


class ClassBalancedDemonstrations:
    """N-way K-shot demonstrations for classification: K examples of each of the N classes, in
    random order, so every query's class is in its prompt (as the Flamingo paper's few-shot
    episodes, not OpenFlamingo's draws). ``shots`` counts all demonstrations: N x K.

    Args:
        train: the training examples (each with a ``class_name``).
        seed: seeds Python's ``random`` for the draws, query after query.
    """

    def __init__(self, train: Sequence[dict], seed: int):
        self.by_class: dict[str, list[dict]] = {}
        for item in train:
            self.by_class.setdefault(item["class_name"], []).append(item)
        self.rng = random.Random(seed)

    def __call__(self, queries: Sequence[dict], shots: int) -> list[list[dict]]:
        ways = len(self.by_class)
        if shots % ways:
            raise ValueError(f"class-balanced shots must be a multiple of the {ways} classes, got {shots}")
        per_class = shots // ways
        fewest = min(len(items) for items in self.by_class.values())
        if per_class > fewest:
            raise ValueError(f"{per_class} demonstrations per class asked for but a class has {fewest}")
        drawn = []
        for _ in queries:
            demos = [item for items in self.by_class.values() for item in self.rng.sample(items, per_class)]
            self.rng.shuffle(demos)
            drawn.append(demos)
        return drawn


FeatureFunction = Callable[[list], torch.Tensor]  # images (paths or PIL) -> (b, e) features


class RicesDemonstrations:
    """Retrieval-based in-context example selection: the most similar training images.

    Args:
        train: the training examples.
        features: maps a list of images to (b, e) features (e.g. ``vision_features`` of the model).
        batch_size: images per call of ``features`` when the training set is encoded.
        cache_path: a file for the training features: read if it exists, else written (torch.save).
    """

    def __init__(
        self, train: Sequence[dict], features: FeatureFunction, batch_size: int = 32, cache_path: str | None = None
    ):
        self.train, self.features = list(train), features
        if cache_path is not None and Path(cache_path).exists():
            stored = torch.load(cache_path, map_location="cpu", weights_only=True)
            if stored.shape[0] != len(self.train):
                count = len(self.train)
                raise ValueError(f"{cache_path} holds {stored.shape[0]} features but there are {count} examples")
            self.train_features = stored
        else:
            self.train_features = self.encode([item["image"] for item in self.train], batch_size)
            if cache_path is not None:
                Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
                torch.save(self.train_features, cache_path)

    def encode(self, images: list, batch_size: int) -> torch.Tensor:
        parts = [self.normalized(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return torch.cat(parts)  # (n, e)

    def normalized(self, images: list) -> torch.Tensor:
        with torch.no_grad():
            features = self.features(images).float().cpu()  # (b, e)
        return features / features.norm(dim=-1, keepdim=True)

    def __call__(self, queries: Sequence[dict], shots: int) -> list[list[dict]]:
        similarity = self.normalized([item["image"] for item in queries]) @ self.train_features.T  # (b, n)
        nearest = similarity.argsort(dim=-1, descending=True)[:, :shots]  # (b, shots)
        return [[self.train[i] for i in reversed(row.tolist())] for row in nearest]
