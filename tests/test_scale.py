"""The 355B model builds abstractly and its forward lowers on CPU without materialising weights."""

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax import GlmMoeModel, ModelConfig


def test_glm45_builds_abstractly_and_forward_lowers():
    config = ModelConfig.preset("glm45", param_dtype="bfloat16", dtype="bfloat16")
    model = nnx.eval_shape(lambda: GlmMoeModel(config, rngs=nnx.Rngs(0)))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert 350e9 <= params <= 360e9
    assert params == config.param_counts()["total"]
    lowered = _lower_forward(model)
    out = lowered.out_info
    assert out.shape == (1, 4096, config.vocab_size) and out.dtype == jnp.bfloat16
    # layers are scanned, not unrolled: a 5-layer model lowers to a program of the same size
    shallow = nnx.eval_shape(lambda: GlmMoeModel(config.replace(num_hidden_layers=5),
                                                 rngs=nnx.Rngs(0)))
    assert lowered.as_text().count("\n") == _lower_forward(shallow).as_text().count("\n")


def _lower_forward(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids)).lower(
        state, jax.ShapeDtypeStruct((1, 4096), jnp.int32))
