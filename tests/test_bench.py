"""`bench --what=train` runs on CPU (what CI exercises before a GPU is lent): one JSON line with
our step's throughput and XLA's temporaries, from a step that trains."""

import json

from experiments import bench


def test_train_bench_emits_one_record_of_a_training_step(capsys, monkeypatch):
    monkeypatch.setitem(bench.CPU_TRAIN_CONFIG, "num_hidden_layers", 2)  # a quicker compile
    bench.train_bench()
    (line,) = [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    record = json.loads(line)
    assert record["bench"] == "train" and record["model"] == "cpu_small"
    assert record["glm_jax_tokens_per_s"] > 0 and record["temp_GiB"] > 0
    assert record["loss_last"] < record["loss_first"]  # four steps on one batch: it learns
    assert "mfu" not in record  # no known peak for a CPU
