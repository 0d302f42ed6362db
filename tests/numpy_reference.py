"""An independent float64 numpy GLM-4.5 forward (main model and MTP layer) that reads a Hub-layout
checkpoint directly: written from SPEC.md, sharing no code with glm_jax, so tests can check the
JAX model against it on checkpoints transformers never saw."""

import glob
import json
import os

import numpy as np

from glm_jax.convert.safetensors_io import SafetensorsFile  # only the file reader is shared


def load(directory):
    config = json.load(open(os.path.join(directory, "config.json")))
    weights = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        f = SafetensorsFile(path)
        weights.update({k: np.asarray(f.get(k), np.float64) for k in f.keys()})
    rope = config.get("rope_parameters") or {}
    config["_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    config["_rotary_factor"] = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
    return config, weights


def rms(x, w, eps):
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def silu(x):
    return x / (1 + np.exp(-x))


def rope(x, theta, factor):  # x [B, S, heads, d], positions 0..S-1
    d = x.shape[-1]
    rd = int(d * factor)
    inv = 1.0 / theta ** (np.arange(0, rd, 2) / rd)
    freqs = np.arange(x.shape[1])[:, None] * inv[None]
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb)[None, :, None], np.sin(emb)[None, :, None]
    xr, xp = x[..., :rd], x[..., rd:]
    rotated = np.concatenate([-xr[..., rd // 2:], xr[..., :rd // 2]], -1)
    return np.concatenate([xr * cos + rotated * sin, xp], -1)


def attention(c, w, p, x):
    b, s, _ = x.shape
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]

    def linear(name, t):
        y = t @ w[p + name + ".weight"].T
        return y + w[p + name + ".bias"] if p + name + ".bias" in w else y

    q = linear("self_attn.q_proj", x).reshape(b, s, nh, hd)
    k = linear("self_attn.k_proj", x).reshape(b, s, nkv, hd)
    v = linear("self_attn.v_proj", x).reshape(b, s, nkv, hd)
    if c["use_qk_norm"]:
        q = rms(q, w[p + "self_attn.q_norm.weight"], c["rms_norm_eps"])
        k = rms(k, w[p + "self_attn.k_norm.weight"], c["rms_norm_eps"])
    q, k = rope(q, c["_theta"], c["_rotary_factor"]), rope(k, c["_theta"], c["_rotary_factor"])
    k, v = np.repeat(k, nh // nkv, 2), np.repeat(v, nh // nkv, 2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd) + np.triu(np.full((s, s), -np.inf), 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, nh * hd)
    return out @ w[p + "self_attn.o_proj.weight"].T


def mlp(w, p, x):
    gate, up = x @ w[p + "gate_proj.weight"].T, x @ w[p + "up_proj.weight"].T
    return (silu(gate) * up) @ w[p + "down_proj.weight"].T


def moe(c, w, p, x):
    b, s, h = x.shape
    t = x.reshape(-1, h)
    e, groups, keep, k = (c["n_routed_experts"], c["n_group"], c["topk_group"],
                          c["num_experts_per_tok"])
    scores = 1 / (1 + np.exp(-(t @ w[p + "mlp.gate.weight"].T)))
    choice = scores + w[p + "mlp.gate.e_score_correction_bias"]
    group_scores = np.sort(choice.reshape(-1, groups, e // groups), -1)[..., -2:].sum(-1)
    kept = np.argsort(-group_scores, -1, kind="stable")[:, :keep]
    group_mask = np.zeros_like(group_scores)
    np.put_along_axis(group_mask, kept, 1, -1)
    choice = np.where(np.repeat(group_mask, e // groups, -1) > 0, choice, -np.inf)
    chosen = np.argsort(-choice, -1, kind="stable")[:, :k]
    weight = np.take_along_axis(scores, chosen, -1)
    if c["norm_topk_prob"]:
        weight = weight / (weight.sum(-1, keepdims=True) + 1e-20)
    weight = weight * c["routed_scaling_factor"]
    out = np.zeros_like(t)
    for n in range(t.shape[0]):
        for j in range(k):
            out[n] += weight[n, j] * mlp(w, f"{p}mlp.experts.{chosen[n, j]}.", t[n])
    out = out.reshape(b, s, h)
    if w[p + "mlp.shared_experts.gate_proj.weight"].size:
        out = out + mlp(w, p + "mlp.shared_experts.", x)
    return out


def layer(c, w, i, x, moe_layer):
    p, eps = f"model.layers.{i}.", c["rms_norm_eps"]
    x = x + attention(c, w, p, rms(x, w[p + "input_layernorm.weight"], eps))
    h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
    return x + (moe(c, w, p, h) if moe_layer else mlp(w, p + "mlp.", h))


def forward(c, w, ids):
    """-> (logits [B, S, V], final-norm hidden [B, S, H])."""
    x = w["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        x = layer(c, w, i, x, i >= c["first_k_dense_replace"])
    hidden = rms(x, w["model.norm.weight"], c["rms_norm_eps"])
    return hidden @ w["lm_head.weight"].T, hidden


def mtp_logits(c, w, hidden, next_ids):
    """SPEC.md §2: shared_head(layer(eh_proj([enorm(embed(next_ids)), hnorm(hidden)])))."""
    L, eps = c["num_hidden_layers"], c["rms_norm_eps"]
    p = f"model.layers.{L}."
    embed = w.get(p + "embed_tokens.weight", w["model.embed_tokens.weight"])
    head = w.get(p + "shared_head.head.weight", w["lm_head.weight"])
    e = rms(embed[next_ids], w[p + "enorm.weight"], eps)
    h = rms(hidden, w[p + "hnorm.weight"], eps)
    x = layer(c, w, L, np.concatenate([e, h], -1) @ w[p + "eh_proj.weight"].T, moe_layer=True)
    return rms(x, w[p + "shared_head.norm.weight"], eps) @ head.T
