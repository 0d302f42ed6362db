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
    # forward + backward is timed on its own too (no timing comparison: CI shares its cores)
    assert record["glm_jax_fwd_bwd_tokens_per_s"] > 0
    assert record["loss_last"] < record["loss_first"]  # four steps on one batch: it learns
    assert "mfu" not in record  # no known peak for a CPU


def test_gmm_bench_reports_every_direction_per_implementation(capsys, monkeypatch):
    """`bench --what=gmm` on CPU: a timing per (implementation, direction) for tokamax's "xla"
    (when installed), lax.ragged_dot and the reference, forward+backward of the differentiable
    ops, and the per-direction table line."""
    monkeypatch.setattr(bench, "CPU_GMM_SHAPES", [("test_cpu", 64, 16, 8, 4)])
    assert bench.BENCHMARKS["gmm"] is bench.gmm_bench
    bench.gmm_bench()
    records = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert not [r for r in records if "error" in r], records
    timed = {(r["impl"], r["direction"]) for r in records if r["bench"] == "gmm"}
    impls = ["lax.ragged_dot", "reference", "kernels.gmm", "dense_matmul"]
    try:
        import tokamax  # noqa: F401
        impls.append("tokamax:xla")
    except ImportError:
        pass
    for impl in impls:
        for direction in bench.GMM_DIRECTIONS:
            assert (impl, direction) in timed
    assert ("kernels.gmm", "fwd_bwd") in timed and ("lax.ragged_dot", "fwd_bwd") in timed
    assert all(r["ms"] > 0 for r in records if r["bench"] == "gmm")
    (table,) = [r for r in records if r["bench"] == "gmm_table"]
    assert table["implementations"] == ({d: "xla" for d in bench.GMM_DIRECTIONS}
                                        if "tokamax:xla" in impls else {})


def test_transformers_train_script_builds_the_bench_model():
    """experiments/benchmarks/hf_train_step.py (run in a torch environment) times the model
    `bench --what=train` builds on CPU: every dimension it sets is ours."""
    import importlib.util

    from glm_jax import ModelConfig

    path = bench.__file__.replace("bench.py", "benchmarks/hf_train_step.py")
    spec = importlib.util.spec_from_file_location("hf_train_step", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # torch is imported in main() only
    ours = ModelConfig.preset("tiny", **bench.CPU_TRAIN_CONFIG, num_nextn_predict_layers=0)
    assert {k: getattr(ours, k) for k in script.DIMS} == script.DIMS
