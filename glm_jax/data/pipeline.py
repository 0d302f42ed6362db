"""The pre-training data pipeline: files -> quality buckets -> capped, weighted mixture -> FIM ->
tokens -> packed rows -> batches, as one grain dataset.

Everything up to tokenisation is a grain `MapDataset` (random access by index), so the whole
pipeline is a pure function of (config, seed, shard): its iterator state is a handful of
integers (`it.get_state()` / `it.set_state(state)`, JSON-serialisable, restores exactly), and
each data-parallel process reads a disjoint slice of every bucket's documents.
"""

from __future__ import annotations

import functools
import glob
import os
import zlib

import grain
import ml_collections
import numpy as np
from absl import logging
from tokenizers import Tokenizer

from glm_jax.data.corpus import build_stdlib_corpus
from glm_jax.data.fim import apply_fim
from glm_jax.data.mixture import Bucket, mix_buckets
from glm_jax.data.packing import document_features, pack
from glm_jax.data.sources import DocumentSource, RecordFormat
from glm_jax.data.tokenizer import encode_document, load_tokenizer, train_bpe

CACHE_DIR = "{cache_dir}"


def default_data_config() -> ml_collections.ConfigDict:
    """The built-in Python-stdlib corpus in three quality buckets (best 3.2 epochs, worst
    dropped, as in the GLM-4.5 report), FIM on half of the code, concat-then-split packing."""
    stdlib = f"{CACHE_DIR}/stdlib"

    def bucket(name, epochs):
        return dict(files=(f"{stdlib}/{name}.jsonl",), epochs=epochs, weight=0.0, is_code=False)

    return ml_collections.ConfigDict(dict(
        # Bucket files: glob patterns; "{cache_dir}" is the cache_dir given to build_pipeline.
        # epochs: cap per pass (0 drops the bucket); weight: mixing weight, 0 = the capped size;
        # is_code: every document is code (else a record's truthy `code_field` says so).
        buckets=dict(high=bucket("high", 3.2), medium=bucket("medium", 1.0),
                     low=bucket("low", 0.0)),
        stdlib=dict(build=True, max_files=0),  # build the stdlib corpus into {cache_dir}/stdlib
        text_field="text",
        code_field="is_code",
        on_bad_record="skip",  # or "raise"
        concat_repos=False,  # one document per repository (mid-training)
        fim=dict(rate=0.5, spm_rate=0.5),
        packing=dict(method="concat_then_split", num_bins=64),  # or "best_fit"
        num_passes=0,  # passes over the mixture, each reshuffled; 0 = endless
        read_threads=2,
        prefetch_buffer_size=64,
        bpe_sample_chars=8_000_000,  # corpus sample for tokenizer_for's BPE
    ))


def _seed(seed: int, name: str) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def _bucket_files(name: str, patterns, cache_dir) -> list[str]:
    files = []
    for pattern in patterns:
        if CACHE_DIR in pattern:
            if cache_dir is None:
                raise ValueError(
                    f"bucket {name!r}: {pattern!r} needs build_pipeline(cache_dir=...)")
            pattern = pattern.replace(CACHE_DIR, os.fspath(cache_dir))
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise ValueError(f"bucket {name!r}: no data file matches {pattern!r}")
        files += matches
    return files


def _mixture(config, *, seed: int, shard_index: int, shard_count: int,
             cache_dir: str | os.PathLike | None) -> grain.MapDataset:
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    if config.stdlib.build:
        if cache_dir is None:
            raise ValueError("data.stdlib.build needs build_pipeline(cache_dir=...)")
        build_stdlib_corpus(os.path.join(cache_dir, "stdlib"), max_files=config.stdlib.max_files)
    record_format = RecordFormat(text_field=config.text_field, code_field=config.code_field,
                                 on_bad_record=config.on_bad_record)
    buckets = []
    for name, b in config.buckets.items():
        if b.epochs == 0:
            logging.info("bucket %r: dropped (cap 0 epochs)", name)
            continue
        source = DocumentSource(_bucket_files(name, b.files, cache_dir),
                                record_format=record_format, is_code=b.is_code,
                                concat_repos=config.concat_repos)
        docs = grain.MapDataset.source(source)[shard_index::shard_count]
        buckets.append(Bucket(name, docs, epochs=b.epochs, weight=b.weight))
    return mix_buckets(buckets, seed)


def build_documents(config: ml_collections.ConfigDict, *, seed: int, shard_index: int = 0,
                    shard_count: int = 1,
                    cache_dir: str | os.PathLike | None = None) -> grain.MapDataset:
    """-> the mixed documents {"text", "is_code"}, FIM applied, `num_passes` passes long."""
    docs = _mixture(config, seed=seed, shard_index=shard_index, shard_count=shard_count,
                    cache_dir=cache_dir)
    docs = docs.repeat(config.num_passes or None)
    fim = functools.partial(apply_fim, rate=config.fim.rate, spm_rate=config.fim.spm_rate)
    return docs.random_map(fim, seed=_seed(seed, "fim"))


def _features(tokenizer: Tokenizer, doc: dict) -> dict[str, np.ndarray]:
    return document_features(encode_document(tokenizer, doc["text"]))


def build_pipeline(config: ml_collections.ConfigDict, *, tokenizer: Tokenizer, seq_len: int,
                   batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                   cache_dir: str | os.PathLike | None = None) -> grain.IterDataset:
    """-> batches {input_ids, target_ids, segment_ids, positions [B, S] int32,
    loss_mask [B, S] float32} for data-parallel process `shard_index` of `shard_count`."""
    docs = build_documents(config, seed=seed, shard_index=shard_index, shard_count=shard_count,
                           cache_dir=cache_dir)
    stream = docs.map(functools.partial(_features, tokenizer)).to_iter_dataset(
        grain.ReadOptions(num_threads=config.read_threads,
                          prefetch_buffer_size=config.prefetch_buffer_size))
    rows = pack(stream, seq_len, method=config.packing.method, num_bins=config.packing.num_bins,
                seed=_seed(seed, "packing"))
    return rows.batch(batch_size, drop_remainder=True)


def tokenizer_for(config: ml_collections.ConfigDict, workdir) -> Tokenizer:
    """The trainer's tokenizer: `config.tokenizer_path` if set, else a byte-level BPE of
    `config.tokenizer_vocab_size` trained once on a sample of the mixture (documents in mixing
    order, FIM off, up to `data.bpe_sample_chars`) and cached as `workdir/tokenizer.json`."""
    if config.tokenizer_path:
        return load_tokenizer(config.tokenizer_path)
    cache_path = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(cache_path):
        return load_tokenizer(cache_path)
    docs = _mixture(config.data, seed=0, shard_index=0, shard_count=1,
                    cache_dir=os.path.join(workdir, "data"))

    def sample():
        chars = 0
        for i in range(len(docs)):
            if chars >= config.data.bpe_sample_chars:
                return
            text = docs[i]["text"]
            chars += len(text)
            yield text

    return train_bpe(sample(), config.tokenizer_vocab_size, cache_path)
