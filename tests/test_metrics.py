"""Training metrics at GLM-4.5 scale: the expert-load histogram is logged from the counts, in
memory that does not grow with the number of routed tokens; a partial jsonl line is dropped."""

import struct
import tracemalloc

import numpy as np
from tensorboardX.proto import event_pb2

from glm_jax.train.metrics import MetricsLogger, add_expert_histogram


def _events(directory):
    """The Event protos of the TensorBoard files under `directory` (TFRecord framing)."""
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            yield event
            pos += 12 + length + 4


def test_expert_histogram_at_glm45_scale_in_bounded_memory(tmp_path):
    rng = np.random.default_rng(0)
    load = rng.integers(5 * 10**8, 2 * 10**9, size=(89, 160)).astype(np.int64)  # ~1.1e11 copies
    logger = MetricsLogger(tmp_path, start_step=0, total_steps=1)
    tracemalloc.start()
    add_expert_histogram(logger.tensorboard, load, 1)
    histogram_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    logger.log(1, {"loss": 1.0, "expert_load": load})  # + jsonl record and heatmap PNG
    log_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    logger.close()
    assert histogram_peak < 1024 ** 2  # one sample per routed token would be ~900 GB
    assert log_peak < 200 * 1024 ** 2  # mostly matplotlib's 1600 x 1200 px canvas
    histograms = [v.histo for e in _events(tmp_path) for v in e.summary.value
                  if v.tag == "expert_load"]
    assert len(histograms) == 2  # the direct call and the logger's, both step 1
    histo = histograms[-1]
    totals = load.sum(axis=0)
    np.testing.assert_allclose(histo.bucket, totals, rtol=1e-12)
    assert histo.num == totals.sum() and histo.min == 0 and histo.max == 159
    np.testing.assert_allclose(histo.sum, (np.arange(160) * totals).sum(), rtol=1e-12)


def test_partial_last_line_is_dropped_on_resume(tmp_path):
    logger = MetricsLogger(tmp_path, start_step=0, total_steps=3)
    for step in (1, 2, 3):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    MetricsLogger(tmp_path, start_step=2, total_steps=3).close()  # resumed at step 2
    assert (tmp_path / "metrics.jsonl").read_text() == (
        '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n')


def test_heatmap_is_drawn_first_then_throttled_and_last_at_close(tmp_path, monkeypatch):
    from glm_jax.train import metrics

    drawn = []
    monkeypatch.setattr(metrics, "write_load_heatmap", lambda load, path, step: drawn.append(step))
    logger = MetricsLogger(tmp_path, start_step=0, total_steps=5)
    for step in range(1, 6):
        logger.log(step, {"loss": 1.0, "expert_load": np.full((2, 4), step)})
    assert drawn == [1]  # the rest within HEATMAP_SECONDS of it
    logger.close()
    assert drawn == [1, 5]  # the newest load, once more at the end
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 5 and all('"expert_load"' in r for r in records)
