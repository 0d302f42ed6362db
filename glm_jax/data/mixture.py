"""Quality buckets: epoch caps and weighted mixing (GLM-4.5 report §2: the best bucket is seen
about 3.2 epochs, the worst is dropped).

A bucket with cap E is shuffled afresh for each epoch (grain folds the epoch into the seed)
and cut to round(E * N) documents: 3.2 = three full passes plus 20% of a fourth, 0 = dropped.

Mixing uses grain's `MapDataset.select_from_datasets` with our own selection map rather than
`MapDataset.mix`: `mix` rounds the weights to integers and ends at the first exhausted bucket,
so a full pass can lose documents. Here document j of bucket b is placed at time
(j + 1/2) / weight_b and the buckets are merged by time: while all buckets last, they are drawn
in proportion to their weights; one that reaches its cap drops out and the rest go on, so a
pass holds every bucket exactly to its cap. The default weight (0) is the bucket's capped size,
which spreads every bucket evenly over the whole pass. The map costs 9 bytes per document of a
pass; passes after the first index it modulo its length and read the buckets' next epochs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging


@dataclasses.dataclass(frozen=True)
class Bucket:
    name: str
    docs: grain.MapDataset  # one epoch of the bucket's documents (this shard's share)
    epochs: float  # the cap
    weight: float = 0.0  # 0: the capped size


def cap_epochs(docs: grain.MapDataset, epochs: float, seed: int) -> grain.MapDataset:
    """`epochs` passes over `docs`, each shuffled differently; a fraction takes a prefix."""
    if epochs < 0:
        raise ValueError(f"epoch cap must be >= 0, got {epochs}")
    total = round(epochs * len(docs))
    if total == 0:
        return docs[:0]
    return docs.shuffle(seed=seed).repeat(math.ceil(epochs))[:total]


class WeightedSelection(grain.transforms.DatasetSelectionMap):
    """Index -> (bucket, index in bucket), merging the buckets by weighted time (see above)."""

    def __init__(self, lengths: Sequence[int], weights: Sequence[float]):
        times = np.concatenate([(np.arange(n) + 0.5) / w for n, w in zip(lengths, weights)])
        order = np.argsort(times, kind="stable")  # ties: the earlier bucket first
        self._bucket = np.repeat(np.arange(len(lengths), dtype=np.uint8), lengths)[order]
        self._index = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])[order]
        self._lengths = tuple(int(n) for n in lengths)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> tuple[int, int]:
        epoch, k = divmod(index, len(self._index))
        bucket = int(self._bucket[k])
        return bucket, int(self._index[k]) + epoch * self._lengths[bucket]


def mix_buckets(buckets: Sequence[Bucket], seed: int) -> grain.MapDataset:
    """One pass of the mixture: every bucket capped, shuffled per epoch, merged by weight."""
    capped, weights = [], []
    for i, bucket in enumerate(buckets):
        if bucket.weight < 0:
            raise ValueError(f"bucket {bucket.name!r}: weight must be >= 0, got {bucket.weight}")
        bucket_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        docs = cap_epochs(bucket.docs, bucket.epochs, bucket_seed)
        if len(docs) == 0:
            logging.info("bucket %r: dropped (%d documents, cap %g epochs)",
                         bucket.name, len(bucket.docs), bucket.epochs)
            continue
        capped.append(docs)
        weights.append(bucket.weight or len(docs))
        logging.info("bucket %r: %d documents, cap %g epochs -> %d per pass, weight %g",
                     bucket.name, len(bucket.docs), bucket.epochs, len(docs), weights[-1])
    if not capped:
        raise ValueError("every data bucket is empty or capped at 0 epochs: nothing to train on")
    if len(capped) > 255:
        raise ValueError(f"at most 255 buckets, got {len(capped)}")
    selection = WeightedSelection([len(d) for d in capped], weights)
    return grain.MapDataset.select_from_datasets(capped, selection)
