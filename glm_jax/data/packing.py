"""Packing tokenised documents into fixed-length rows, with grain's packers.

Each document becomes `input_ids` (its tokens, ending in `<|endoftext|>`), `target_ids` (the
next token of the same document) and `loss_mask` (0 at the document's last token, whose next
token belongs to another document). Splitting a document splits all three alike, so the last
token of a chunk keeps its real next token as target, with loss. Two packers:
  "concat_then_split" (grain.experimental.ConcatThenSplitIterDataset): the stream of documents
      cut into rows, no padding but at the very end; pre-training.
  "best_fit" (grain.experimental.BestFitPackIterDataset): documents longer than a row are cut
      into row-sized chunks first, then each placed whole into the fullest row it fits among
      `num_bins`; fewer cut documents, some padding; mid-training (GLM-4.5 report §2).
Either way a chunk is a segment: `segment_ids` 1, 2, ... per row (0 = padding), `positions`
restart at 0, and the model keeps attention inside a segment.
"""

from __future__ import annotations

import sys

import grain
import numpy as np

FEATURES = ("input_ids", "target_ids", "loss_mask")


def document_features(ids: np.ndarray) -> dict[str, np.ndarray]:
    """Tokens [n] of one document -> its unpacked features, each [n]."""
    ids = np.asarray(ids, dtype=np.int32)
    loss_mask = np.ones(len(ids), dtype=np.float32)
    loss_mask[-1] = 0.0
    return {"input_ids": ids, "target_ids": np.append(ids[1:], np.int32(0)), "loss_mask": loss_mask}


class _Chunk(grain.experimental.FlatMapTransform):
    """Cuts a document's features into pieces of at most `seq_len`."""
    max_fan_out = sys.maxsize  # only the IterDataset flat-map is used, which has no limit

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def flat_map(self, element):
        n = len(element["input_ids"])
        return [{k: v[i:i + self._seq_len] for k, v in element.items()}
                for i in range(0, n, self._seq_len)]


class _TupleSlices(grain.IterDataset):
    """ConcatThenSplit's checkpoint state holds (start, stop) slices that grain 0.2.18 compares
    with a tuple; after a JSON round trip (orbax JsonSave, grain's CheckpointHandler) they are
    lists, and restoring then silently drops a document. This turns them back into tuples."""

    def __iter__(self):
        return _TupleSlicesIterator(self._parent.__iter__())


class _TupleSlicesIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state({**state, "remainder_slices": slices})


def _model_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "input_ids": packed["input_ids"].astype(np.int32),
        "target_ids": packed["target_ids"].astype(np.int32),
        "segment_ids": packed["input_ids_segment_ids"].astype(np.int32),
        "positions": packed["input_ids_positions"].astype(np.int32),
        "loss_mask": packed["loss_mask"].astype(np.float32),
    }


def pack(docs: grain.IterDataset, seq_len: int, *, method: str = "concat_then_split",
         num_bins: int = 64, seed: int = 0) -> grain.IterDataset:
    """Documents' features -> rows {input_ids, target_ids, segment_ids, positions [S] int32,
    loss_mask [S] float32}."""
    lengths = dict.fromkeys(FEATURES, seq_len)
    if method == "concat_then_split":
        packed = _TupleSlices(
            grain.experimental.ConcatThenSplitIterDataset(docs, length_struct=lengths))
    elif method == "best_fit":
        chunks = grain.experimental.FlatMapIterDataset(docs, _Chunk(seq_len))
        packed = grain.experimental.BestFitPackIterDataset(
            chunks, length_struct=lengths, num_packing_bins=num_bins, seed=seed, shuffle_bins=True)
    else:
        raise ValueError(
            f"packing method must be 'concat_then_split' or 'best_fit', got {method!r}")
    return packed.map(_model_row)
