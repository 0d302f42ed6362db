"""Sharding on 8 virtual CPU devices: every mesh gives the single-device logits, gradients and
expert loads; expert weights are split, never all-gathered; checkpoints load into shardings."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax import GlmMoeModel, InputError, ModelConfig, load_hf, save_hf
from glm_jax import sharding

CONFIG = ModelConfig.preset("tiny")
MESHES = [{"data": 8}, {"data": 2, "expert": 4}, {"fsdp": 2, "expert": 2, "tensor": 2},
          {"expert": 8}]


@pytest.fixture(scope="module")
def reference():
    model = nnx.jit(lambda: GlmMoeModel(CONFIG, rngs=nnx.Rngs(0)))()
    graphdef, state = nnx.split(model)
    ids = jax.random.randint(jax.random.key(1), (8, 16), 0, CONFIG.vocab_size)
    loss = _loss_fn(graphdef)
    return graphdef, state, ids, jax.jit(jax.value_and_grad(loss, has_aux=True))(state, ids)


def _loss_fn(graphdef):
    def loss(state, ids):
        out = nnx.merge(graphdef, state).forward(ids)
        mtp = nnx.merge(graphdef, state).mtp_logits(out.hidden[:, :-1], ids[:, 1:])
        return jnp.mean(jax.nn.logsumexp(out.logits, -1)) + jnp.mean(mtp ** 2), out
    return loss


def _sharded_run(graphdef, state, ids, mesh):
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    ids = jax.device_put(ids, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(_loss_fn(graphdef), has_aux=True))
        result = step(state, ids)
        hlo = step.lower(state, ids).compile().as_text()
    return result, hlo


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_mesh_matches_single_device(reference, shape):
    graphdef, state, ids, ((ref_loss, ref_out), ref_grads) = reference
    ((loss, out), grads), _ = _sharded_run(graphdef, state, ids, sharding.make_mesh(shape))
    np.testing.assert_allclose(out.logits, ref_out.logits, atol=1e-4)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_array_equal(out.moe_stats.tokens_per_expert,
                                  ref_out.moe_stats.tokens_per_expert)  # summed over the mesh


@pytest.mark.parametrize("shape", [{"expert": 8}, {"data": 2, "expert": 4}])
def test_expert_parallel_never_gathers_expert_weights(reference, shape):
    graphdef, state, ids, _ = reference
    mesh = sharding.make_mesh(shape)
    _, hlo = _sharded_run(graphdef, state, ids, mesh)
    e, h, f = CONFIG.n_routed_experts, CONFIG.hidden_size, CONFIG.moe_intermediate_size
    weight_shapes = {f"[{e},{h},{f}]", f"[{e},{f},{h}]"}  # one layer's full expert stack
    gathered = re.findall(r"= \w+(\[[\d,]*\])[^=]*? all-gather\(", hlo)
    assert gathered, "expected the token all-gather of expert parallelism"
    assert not weight_shapes & {g for g in gathered}, gathered
    stacked = {f"[{CONFIG.num_moe_layers},{e},{h},{f}]", f"[{CONFIG.num_moe_layers},{e},{f},{h}]"}
    assert not stacked & set(gathered)


def test_expert_weights_are_split_across_devices(reference):
    _, state, _, _ = reference
    mesh = sharding.make_mesh({"expert": 8})
    placed = jax.device_put(state, sharding.state_shardings(state, mesh))
    gate = placed["moe_layers"]["mlp"]["experts"]["gate_proj"][...]
    shards = gate.addressable_shards
    assert len(shards) == 8 and all(s.data.shape[1] == CONFIG.n_routed_experts // 8 for s in shards)
    assert sorted(s.index[1].start for s in shards) == list(range(8))  # one distinct expert each
    full = np.asarray(state["moe_layers"]["mlp"]["experts"]["gate_proj"][...])
    for s in shards:
        np.testing.assert_array_equal(np.asarray(s.data), full[s.index])


def test_parameters_created_directly_sharded():
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    model = sharding.create_sharded(lambda: GlmMoeModel(CONFIG, rngs=nnx.Rngs(0)), mesh)
    spec = model.moe_layers.mlp.experts.gate_proj[...].sharding.spec
    assert tuple(spec) == (None, "expert", "fsdp", "tensor")  # embed: fsdp (expert is taken)
    assert tuple(model.embed_tokens.embedding[...].sharding.spec) == ("tensor", ("fsdp", "expert"))
    assert tuple(model.moe_layers.mlp.gate.e_score_correction_bias[...].sharding.spec) == (
        None, "expert")


def test_load_hf_streams_into_shardings(reference, tmp_path):
    graphdef, state, ids, ((_, ref_out), _) = reference
    save_hf(nnx.merge(graphdef, state), tmp_path / "ckpt")
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    model = load_hf(tmp_path / "ckpt", mesh=mesh)
    gate = model.moe_layers.mlp.experts.gate_proj[...]
    assert tuple(gate.sharding.spec) == (None, "expert", None, None)
    assert gate.addressable_shards[0].data.shape[1] == CONFIG.n_routed_experts // 4
    with jax.set_mesh(mesh):
        logits = nnx.jit(lambda m, i: m(i))(model, jax.device_put(ids, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(logits, ref_out.logits, atol=1e-4)


def test_mesh_construction_errors():
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"pipeline": 2})
    with pytest.raises(ValueError, match="does not divide"):
        sharding.make_mesh({"expert": 3})
    assert dict(sharding.make_mesh({"expert": 4}).shape) == {"data": 2, "fsdp": 1, "expert": 4,
                                                             "tensor": 1}


@pytest.fixture(scope="module")
def tiny_plan():
    """The tiny pre-training config at 32 tokens and its compiled plan on 8 data devices."""
    from configs import pretrain_tiny
    from experiments.plan import memory_plan

    config = pretrain_tiny.get_config()
    config.seq_len = 32
    return config, memory_plan(config, CONFIG, sharding.make_mesh({"data": 8}))


def test_memory_plan_counts_shards_exactly(tiny_plan):
    from experiments.plan import GiB, memory_plan

    config, replicated = tiny_plan
    total = CONFIG.param_counts()["total"] * 4  # float32
    assert round(replicated["param_GiB"] * GiB) == total
    assert replicated["activations_GiB"] > 0
    assert "peak_GiB" not in replicated  # XLA:CPU reports no peak beyond arguments + outputs
    split = memory_plan(config, CONFIG, sharding.make_mesh({"expert": 8}), activations=False)
    experts = 3 * CONFIG.n_routed_experts * CONFIG.hidden_size * CONFIG.moe_intermediate_size
    assert split["param_GiB"] < replicated["param_GiB"]
    # every MoE layer's (and the MTP layer's) expert stack is split 8 ways
    assert split["optimizer_GiB"] < replicated["optimizer_GiB"] - 0.8 * experts * 4 * (
        CONFIG.num_moe_layers + 1) / GiB


def test_memory_plan_with_gradient_accumulation_counts_the_accumulator(tiny_plan):
    """micro_batches > 1 compiles the accumulation scan: its float32 gradient accumulator lives
    beside each micro-batch's backward, which one micro-batch never needs."""
    from experiments.plan import memory_plan

    config, one = tiny_plan
    mesh = sharding.make_mesh({"data": 8})
    two = memory_plan(config, CONFIG, mesh, micro_batches=2)
    assert one["micro_batches"] == 1 and two["micro_batches"] == 2
    assert two["activations_GiB"] > one["activations_GiB"] + 0.25 * one["param_GiB"]
    with pytest.raises(InputError, match="micro_batches must be >= 1"):
        memory_plan(config, CONFIG, mesh, micro_batches=0)


@pytest.mark.parametrize("momentum_dtype, muon_bytes, adam_bytes", [
    ("float32", 4, 4 + 4), ("bfloat16", 2, 2 + 4)])  # AdamW's second moment stays float32
def test_memory_plan_counts_the_optimizer_state_in_its_dtypes(momentum_dtype, muon_bytes,
                                                               adam_bytes):
    from configs import pretrain_tiny
    from experiments.plan import GiB, memory_plan
    from glm_jax.optim import param_labels

    config = pretrain_tiny.get_config()
    config.momentum_dtype = momentum_dtype
    params = nnx.state(nnx.eval_shape(lambda: GlmMoeModel(CONFIG, rngs=nnx.Rngs(0))),
                       nnx.Param)
    sizes = {"muon": 0, "adam": 0}
    for leaf, label in zip(jax.tree.leaves(params), jax.tree.leaves(param_labels(params))):
        sizes[label] += leaf.size
    plan = memory_plan(config, CONFIG, sharding.make_mesh({"data": 8}), activations=False)
    expected = sizes["muon"] * muon_bytes + sizes["adam"] * adam_bytes
    assert 0 <= plan["optimizer_GiB"] * GiB - expected < 64  # plus a few int32 step counts


def test_targeting_picks_the_kernels_of_the_platform_compiled_for(monkeypatch):
    from glm_jax.model.attention import resolve_impl
    from kernels.backends import platform, targeting
    from kernels.gmm import _auto_backend

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    long_bf16 = (jnp.bfloat16, 4096 ** 2, 256)
    assert _auto_backend() == "reference"
    with targeting("tpu"):
        assert platform() == "tpu" and _auto_backend() == "tpu"
        assert resolve_impl("auto", *long_bf16, splash_ok=True) == "splash"
        with targeting("gpu"):
            assert _auto_backend() == "gpu"
            assert resolve_impl("auto", *long_bf16) == "cudnn"
        assert platform() == "tpu"
    assert platform() == "cpu" and resolve_impl("auto", *long_bf16, splash_ok=True) == "blockwise"


def test_plan_for_a_tpu_topology_without_libtpu_says_how_to_install_it(monkeypatch):
    from experiments.plan import tpu_devices

    monkeypatch.setitem(sys.modules, "libtpu", None)  # makes `import libtpu` fail
    with pytest.raises(InputError, match=r"--topology=v5p:2x2x1 compiles with libtpu, which is "
                                         r"not installed: pip install -e '\.\[tpu\]'"):
        tpu_devices("v5p:2x2x1")


def test_plan_compiles_for_a_tpu_topology_on_this_host():
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]')")
    result = subprocess.run(
        [sys.executable, "-m", "experiments", "plan", "--config=configs/pretrain_tiny.py",
         "--topology=v5p:2x2x1", '--mesh={"expert": 4}'],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert plan["compiled_for"] == "TPU v5p:2x2x1" and plan["devices"] == 4
    assert plan["mesh"]["expert"] == 4 and plan["activations_GiB"] > 0
    # the TPU compiler's own peak: parameters and optimizer state are part of it
    assert plan["param_GiB"] + plan["optimizer_GiB"] < plan["peak_GiB"] < plan["total_GiB"]
    small_chip = subprocess.run(  # told the chips have 1 MiB of HBM, the compiler says so
        [sys.executable, "-m", "experiments", "plan", "--config=configs/pretrain_tiny.py",
         "--topology=v5p:2x2x1", '--mesh={"expert": 4}', "--hbm_gib=0.001"],
        capture_output=True, text=True, timeout=600)
    assert small_chip.returncode == 2
    assert "error: the train step does not fit one device: RESOURCE_EXHAUSTED" in (
        small_chip.stderr)


def test_mesh_that_does_not_divide_a_parameter_names_it():
    config = CONFIG.replace(vocab_size=511)  # the vocabulary axis shards over `tensor`
    abstract = nnx.state(nnx.eval_shape(lambda: GlmMoeModel(config, rngs=nnx.Rngs(0))))
    mesh = sharding.make_mesh({"tensor": 2, "data": 4})
    with pytest.raises(InputError, match=r"parameter embed_tokens\.embedding: dimension 0 "
                                         r"\(vocab, size 511\) does not divide over mesh axes "
                                         r"tensor=2 \(2 ways\)"):
        sharding.state_shardings(abstract, mesh)


def test_fsdp_gathers_weights_after_the_cast_and_never_the_embedding_table(reference):
    """float32 master weights, bfloat16 compute, fsdp=8, in the sharding annotations we emit
    (XLA:CPU then computes in float32 and lowers reduce-scatters as all-reduces, so its compiled
    collectives say nothing about a GPU's): each weight is pinned to its shards as float32 and
    gathered only once cast to bfloat16; the embedding table is never replicated, its lookup
    comes out split along `embed` (this device's slice of every row), then the batch."""
    graphdef, state, ids, _ = reference
    graphdef = nnx.graphdef(GlmMoeModel(CONFIG.replace(dtype="bfloat16"), rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh({"fsdp": 8})
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    ids = jax.device_put(ids, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        text = jax.jit(jax.grad(lambda s, i: _loss_fn(graphdef)(s, i)[0])).lower(
            state, ids).as_text()
    constraints = re.findall(r"sdy\.sharding_constraint \S+ <@mesh, \[(.*?)\]> : tensor<(\S+)>",
                             text)
    gathered = [t for spec, t in constraints
                if t.count("x") == 2 and "xi" not in t and not spec.strip("{}, ")]
    assert gathered and all(t.endswith("xbf16") for t in gathered), gathered  # 2-D weights
    h, v = CONFIG.hidden_size, CONFIG.vocab_size
    assert not [t for _, t in constraints if t.startswith(f"{v}x{h}x")]  # the table: as stored
    rows = f"{ids.shape[0]}x{ids.shape[1]}x{h}xbf16"
    assert ('{}, {}, {"fsdp"}', rows) in constraints and ('{"fsdp"}, {}, {}', rows) in constraints
