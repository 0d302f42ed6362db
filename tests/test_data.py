"""The grain data pipeline: sources, bad records, buckets, FIM, repo concatenation, tokenizer,
packing, stdlib corpus, checkpoint/resume and sharding. Tiny synthetic files; no network."""

import collections
import json
import os

import grain
import numpy as np
import pytest

from glm_jax import data
from glm_jax.data import corpus

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "import os\nprint(os.getcwd())\n", "Pack my box with five dozen liquor jugs."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return data.train_bpe(TEXTS * 20, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def corpus_config(files_by_bucket, **overrides):
    config = data.default_data_config()
    config.stdlib.build = False
    config.buckets = {name: dict(files=tuple(files), epochs=epochs, weight=0.0, is_code=False)
                      for name, (files, epochs) in files_by_bucket.items()}
    config.read_threads = 1
    config.prefetch_buffer_size = 4
    config.update(overrides)
    return config


def synthetic_corpus(tmp_path, n=40):
    records = [{"text": f"document {i}: " + "word " * (3 + i % 17) + ("x = 1\n" * (i % 5)),
                "is_code": i % 3 == 0} for i in range(n)]
    return write_jsonl(tmp_path / "docs.jsonl", records), records


# ---------------------------------------------------------------- sources and bad records

def test_each_source_format_reads(tmp_path):
    records = [{"text": t, "is_code": i % 2 == 0} for i, t in enumerate(TEXTS)]
    jsonl = write_jsonl(tmp_path / "a.jsonl", records)
    import pyarrow as pa
    import pyarrow.parquet as pq
    parquet = str(tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(records), parquet)
    paths = [jsonl, parquet]
    from array_record.python import array_record_module  # a dependency (setup.cfg)
    arecord = str(tmp_path / "a.array_record")
    writer = array_record_module.ArrayRecordWriter(arecord, "group_size:1")
    for r in records:
        writer.write(json.dumps(r).encode())
    writer.close()
    paths.append(arecord)
    for path in paths:
        source = data.DocumentSource([path])
        assert [source[i] for i in range(len(source))] == [
            {"text": r["text"], "is_code": r["is_code"]} for r in records], path
    assert all(data.DocumentSource([jsonl], is_code=True)[i]["is_code"] for i in range(4))


def bad_jsonl(tmp_path):
    return write_jsonl(tmp_path / "bad.jsonl", [
        {"text": "good one"}, "{not json", {"body": "no text field"}, {"text": "   "},
        "[1, 2]", {"text": "good two"}])


def test_bad_records_are_counted_logged_and_skipped(tmp_path, caplog):
    path = bad_jsonl(tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq
    parquet = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"text": ["ok", None, ""]}), parquet)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with caplog.at_level("WARNING"):
        source = data.DocumentSource([path, parquet, str(broken)])
    assert [source[i]["text"] for i in range(len(source))] == ["good one", "good two", "ok"]
    assert source.skipped == {path: 4, parquet: 2, str(broken): 1}
    assert f"{path}:2" in caplog.text  # first bad record, file:line
    assert f"{parquet}:record 1" in caplog.text
    assert sum(f"{path}: skipped" in r.getMessage() for r in caplog.records) == 1  # once per file


def test_bad_records_raise_with_file_and_line(tmp_path):
    fmt = data.RecordFormat(on_bad_record="raise")
    with pytest.raises(data.BadRecordError, match=r"bad\.jsonl:2: invalid JSON"):
        data.DocumentSource([bad_jsonl(tmp_path)], record_format=fmt)
    no_text = write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}, {"content": "b"}])
    with pytest.raises(data.BadRecordError, match=r"x\.jsonl:2: missing text field 'text'"):
        data.DocumentSource([no_text], record_format=fmt)
    ok = data.DocumentSource([no_text], record_format=data.RecordFormat(text_field="content"))
    assert len(ok) == 1 and ok[0]["text"] == "b"
    with pytest.raises(data.BadRecordError, match="unreadable"):
        data.DocumentSource([str(tmp_path / "missing.jsonl")], record_format=fmt)


# ---------------------------------------------------------------- buckets and mixing

def test_epoch_caps_over_a_full_pass():
    buckets = [data.Bucket(name, grain.MapDataset.source([(name, i) for i in range(n)]), epochs)
               for name, n, epochs in [("twice", 10, 2.0), ("half", 20, 0.5), ("none", 5, 0.0)]]
    mixed = list(data.mix_buckets(buckets, seed=0))
    counts = collections.Counter(mixed)
    twice = {d: c for d, c in counts.items() if d[0] == "twice"}
    assert twice == {("twice", i): 2 for i in range(10)}
    half = [d for d in counts if d[0] == "half"]
    assert len(half) == 10 and all(counts[d] == 1 for d in half)
    assert not any(d[0] == "none" for d in counts)
    assert len(mixed) == 30


def test_fractional_cap_reshuffles_each_epoch():
    docs = grain.MapDataset.source(list(range(10)))
    out = list(data.cap_epochs(docs, 3.2, seed=7))
    assert len(out) == 32
    epochs = [out[i:i + 10] for i in range(0, 30, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # a new order per epoch
    assert len(set(out[30:])) == 2
    assert out == list(data.cap_epochs(docs, 3.2, seed=7))
    assert out != list(data.cap_epochs(docs, 3.2, seed=8))


def test_mixing_follows_weights_then_drains():
    a = grain.MapDataset.source([("a", i) for i in range(300)])
    b = grain.MapDataset.source([("b", i) for i in range(300)])
    mixed = list(data.mix_buckets([data.Bucket("a", a, 1.0, weight=3.0),
                                   data.Bucket("b", b, 1.0, weight=1.0)], seed=0))
    share_a = sum(d[0] == "a" for d in mixed[:200]) / 200
    assert share_a == pytest.approx(0.75, abs=0.02)
    assert len(mixed) == 600 and len(set(mixed)) == 600  # a exhausted first, b goes on


# ---------------------------------------------------------------- FIM

def unfim(text):
    p, m, s = data.CODE_PREFIX, data.CODE_MIDDLE, data.CODE_SUFFIX
    if text.startswith(p):  # PSM
        prefix, rest = text[len(p):].split(s)
        suffix, middle = rest.split(m)
    else:  # SPM
        suffix, rest = text[len(s):].split(p)
        prefix, middle = rest.split(m)
    return prefix + middle + suffix


@pytest.mark.parametrize("spm_rate, first", [(0.0, data.CODE_PREFIX), (1.0, data.CODE_SUFFIX)])
def test_fim_formats_reassemble(tokenizer, spm_rate, first):
    rng = np.random.default_rng(0)
    sentinels = (data.CODE_PREFIX, data.CODE_SUFFIX, data.CODE_MIDDLE)
    order = sentinels if first == data.CODE_PREFIX else (sentinels[1], sentinels[0], sentinels[2])
    ids = [tokenizer.token_to_id(s) for s in order]
    for text in TEXTS:
        out = data.fim_permute(text, rng, spm_rate=spm_rate)
        assert out.startswith(first) and unfim(out) == text
        assert [out.count(s) for s in sentinels] == [1, 1, 1]
        tokens = data.encode_document(tokenizer, out).tolist()
        assert [t for t in tokens if t in ids] == ids  # one token each, in order


def test_fim_rate_and_non_code():
    rng = np.random.default_rng(0)
    code, prose = {"text": TEXTS[0], "is_code": True}, {"text": TEXTS[1], "is_code": False}
    assert data.apply_fim(code, rng, rate=0.0, spm_rate=0.5) == code
    assert data.apply_fim(prose, rng, rate=1.0, spm_rate=0.5) == prose
    out = data.apply_fim(code, rng, rate=1.0, spm_rate=0.5)
    assert out["text"] != code["text"] and unfim(out["text"]) == code["text"]


# ---------------------------------------------------------------- repository concatenation

def test_repo_concatenation_orders_files_with_separators(tmp_path):
    path = write_jsonl(tmp_path / "repo.jsonl", [
        {"text": "B", "repo": "r1", "path": "pkg/b.py", "is_code": True},
        {"text": "lonely"},
        {"text": "X", "repo": "r2", "path": "x.py"},
        {"text": "A", "repo": "r1", "path": "pkg/a.py"}])
    source = data.DocumentSource([path], concat_repos=True)
    sep = data.FILE_SEP
    assert [source[i] for i in range(len(source))] == [
        {"text": f"{sep}pkg/a.py\nA{sep}pkg/b.py\nB", "is_code": True},
        {"text": "lonely", "is_code": False},
        {"text": f"{sep}x.py\nX", "is_code": False}]
    assert len(data.DocumentSource([path])) == 4


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("method", ["concat_then_split", "best_fit"])
def test_packing_invariants(method):
    seq_len, rng = 16, np.random.default_rng(0)
    # Document d's tokens are 1000*d + j: a token names its document and its successor is +1.
    docs = [1000 * d + np.arange(int(rng.integers(1, 40)), dtype=np.int32) for d in range(1, 30)]
    stream = grain.MapDataset.source(docs).map(data.document_features).to_iter_dataset()
    rows = list(data.pack(stream, seq_len, method=method, num_bins=4))
    chunks = collections.defaultdict(list)
    for row in rows:
        x, t, seg, pos, mask = (row[k] for k in ("input_ids", "target_ids", "segment_ids",
                                                   "positions", "loss_mask"))
        assert all(v.shape == (seq_len,) for v in row.values())
        assert (x.dtype, seg.dtype, pos.dtype, mask.dtype) == (np.int32,) * 3 + (np.float32,)
        used = seg > 0
        assert np.array_equal(used, np.arange(seq_len) < used.sum())  # padding only at the end
        assert np.all(mask[~used] == 0) and np.all(x[~used] == 0)
        ids = seg[used]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        for s in np.unique(ids):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(pos[where], np.arange(len(where)))
            assert np.array_equal(x[where][1:], t[where][:-1])  # target = next input in segment
            chunk = x[where]
            doc = docs[chunk[0] // 1000 - 1]
            is_last = chunk == doc[-1]
            assert np.array_equal(mask[where] == 0, is_last)  # no loss only at the doc end
            assert np.array_equal(t[where][~is_last], chunk[~is_last] + 1)
            chunks[chunk[0] // 1000].append(chunk)
    rebuilt = {d: np.concatenate(sorted(c, key=lambda c: c[0])) for d, c in chunks.items()}
    assert sorted(rebuilt) == list(range(1, 30))
    assert all(np.array_equal(rebuilt[d], docs[d - 1]) for d in rebuilt)  # none lost or doubled


# ---------------------------------------------------------------- tokenizer

def test_bpe_is_trained_once_and_cached(tmp_path):
    path = tmp_path / "bpe" / "tokenizer.json"
    tok = data.train_bpe(TEXTS * 10, 300, path)
    mtime = os.stat(path).st_mtime_ns

    def must_not_train():
        raise AssertionError("retrained")
        yield

    again = data.train_bpe(must_not_train(), 300, path)
    assert os.stat(path).st_mtime_ns == mtime and again.get_vocab() == tok.get_vocab()
    assert tok.get_vocab_size() == 300
    for token in data.GLM_SPECIAL_TOKENS + (data.FILE_SEP,):
        assert tok.encode(token, add_special_tokens=False).ids == [tok.token_to_id(token)]
    ids = data.encode_document(tok, TEXTS[0])
    assert ids.dtype == np.int32 and ids[-1] == tok.token_to_id(data.EOT)
    assert tok.decode(ids[:-1].tolist()) == TEXTS[0]
    assert data.load_tokenizer(path).get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="tokenizer.json"):
        data.load_tokenizer(tmp_path / "nope.json")


# ---------------------------------------------------------------- stdlib corpus

def test_stdlib_corpus_builds_into_buckets_and_feeds_the_pipeline(tmp_path, tokenizer):
    paths = data.build_stdlib_corpus(tmp_path / "stdlib", max_files=5)
    assert set(paths) == {"high", "medium", "low"}
    docs = [json.loads(line) for p in paths.values() for line in open(p)]
    modules = {d["path"] for d in docs if d["is_code"]}
    assert len(modules) == 4 and any(not d["is_code"] for d in docs)
    heldout = [json.loads(line) for line in open(tmp_path / "stdlib" / "heldout.jsonl")]
    assert len(heldout) == 1 and heldout[0]["is_code"]  # the first module: no text of it trains
    assert all(d["path"] != heldout[0]["path"] for d in docs)
    text = data.heldout_code(tmp_path / "stdlib", 300)
    assert 0 < len(text) <= 300 and heldout[0]["text"].startswith(text)
    stamp = os.stat(tmp_path / "stdlib" / "manifest.json").st_mtime_ns
    data.build_stdlib_corpus(tmp_path / "stdlib", max_files=5)
    assert os.stat(tmp_path / "stdlib" / "manifest.json").st_mtime_ns == stamp  # reused
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a stdlib corpus build"):
        data.build_stdlib_corpus(tmp_path / "mine", max_files=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert corpus.prose_quality("x = 1") == "low"
    assert corpus.prose_quality("Return the sum of the two numbers given, raising a helpful "
                                "error when either of them is not numeric at all. " * 3) == "high"
    config = data.default_data_config()  # the default corpus, cut to a few modules
    config.stdlib.max_files = 5
    config.read_threads = 1
    batch = next(iter(data.build_pipeline(config, tokenizer=tokenizer, seq_len=32, batch_size=2,
                                          seed=0, cache_dir=tmp_path)))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "input_ids": ((2, 32), np.int32), "target_ids": ((2, 32), np.int32),
        "segment_ids": ((2, 32), np.int32), "positions": ((2, 32), np.int32),
        "loss_mask": ((2, 32), np.float32)}


# ---------------------------------------------------------------- checkpoint, determinism, shards

@pytest.mark.parametrize("taken", [0, 3])  # 0: the state with no half-packed document
@pytest.mark.parametrize("method", ["concat_then_split", "best_fit"])
def test_resume_from_saved_state_gives_identical_batches(tmp_path, tokenizer, method, taken):
    path, _ = synthetic_corpus(tmp_path)
    config = corpus_config({"all": ([path], 1.5)}, packing=dict(method=method, num_bins=4))

    def batches():
        return iter(data.build_pipeline(config, tokenizer=tokenizer, seq_len=24, batch_size=2,
                                        seed=3))

    it = batches()
    first = [next(it) for _ in range(taken)]
    state = json.loads(json.dumps(it.get_state()))  # as orbax's JsonSave stores it
    expected = [next(it) for _ in range(4)]
    resumed = batches()
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(4)]):
        assert all(np.array_equal(want[k], got[k]) for k in want)
    again = batches()
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first + expected, again) for k in a)


def test_shards_read_disjoint_documents(tmp_path):
    path, records = synthetic_corpus(tmp_path)
    config = corpus_config({"all": ([path], 1.0)}, num_passes=1, fim=dict(rate=0.0, spm_rate=0.5))
    shards = [{d["text"] for d in data.build_documents(config, seed=0, shard_index=i,
                                                        shard_count=2)} for i in range(2)]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == {r["text"] for r in records}


def test_tokenizer_for_trains_on_the_corpus_once_or_loads_a_given_file(tmp_path, tokenizer):
    import ml_collections
    path, _ = synthetic_corpus(tmp_path)
    config = ml_collections.ConfigDict(dict(
        tokenizer_path="", tokenizer_vocab_size=300,
        data=corpus_config({"all": ([path], 1.0)}, bpe_sample_chars=2_000)))
    trained = data.tokenizer_for(config, tmp_path / "run")
    assert trained.get_vocab_size() == 300 and (tmp_path / "run" / "tokenizer.json").exists()
    assert data.tokenizer_for(config, tmp_path / "run").get_vocab() == trained.get_vocab()
    tokenizer.save(str(tmp_path / "given.json"))
    config.tokenizer_path = str(tmp_path / "given.json")
    assert data.tokenizer_for(config, tmp_path / "other").get_vocab() == tokenizer.get_vocab()


def test_bpe_pieces_are_bounded_so_training_stays_fast(tmp_path):
    """One long run with no spaces (minified code, base64) is cut into pieces of at most
    MAX_PIECE_CHARS before BPE training, which is quadratic in a piece's length (200k such
    characters took 25 s unbounded, a 10 MB document hours); normal text splits as before."""
    from glm_jax.data.tokenizer import MAX_PIECE_CHARS

    rng = np.random.default_rng(0)
    run = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 300_000))
    tokenizer = data.train_bpe([run, "def f(x):\n    return x + 1\n" * 50], 400,
                               tmp_path / "tok.json")
    pieces = tokenizer.pre_tokenizer.pre_tokenize_str(run[:1000])
    assert max(len(p) for p, _ in pieces) == MAX_PIECE_CHARS
    assert [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str("def f(x):")] == [
        "def", "Ġf", "(", "x", "):"]
    text = "def  héllo(x):\n\treturn 'ü€' + " + run[:500]
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
