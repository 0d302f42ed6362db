"""transformers' side of `bench --what=train` on CPU, for machines where torch only installs in
another Python (here: the CPU torch wheel is for 3.11, glm-jax needs 3.12).

    .venv-ref/bin/python experiments/benchmarks/hf_train_step.py [grouped_mm|eager]

Glm4MoeForCausalLM with `bench.CPU_TRAIN_CONFIG`'s dimensions on top of the `tiny` preset
(random weights: speed does not depend on them), forward + backward of the causal-LM loss at
8 x 256 tokens in float32, sdpa attention; one JSON line with the best of 5 after 2 warm-ups
(what `bench`'s `_time` does for our side). Run it by path: the repo's top-level `kernels`
package would shadow the one transformers probes for. tests/test_bench.py checks that DIMS
matches the config `bench --what=train` builds.
"""

import json
import sys
import time

# bench.CPU_TRAIN_CONFIG over ModelConfig.preset("tiny"), no MTP layer, in transformers' names.
DIMS = dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1,
            intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16,
            n_shared_experts=1, num_experts_per_tok=4, n_group=2, topk_group=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, use_qk_norm=True,
            routed_scaling_factor=2.5, partial_rotary_factor=0.5, attention_bias=True,
            norm_topk_prob=True)
BATCH, SEQ = 8, 256


def main(experts_implementation: str = "grouped_mm") -> None:
    import torch
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(0)
    model = Glm4MoeForCausalLM._from_config(
        Glm4MoeConfig(**DIMS), attn_implementation="sdpa",
        experts_implementation=experts_implementation).train()
    ids = torch.randint(0, DIMS["vocab_size"], (BATCH, SEQ))

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    for _ in range(2):
        step()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    print(json.dumps({"bench": "train_transformers", "experts_implementation":
                      experts_implementation, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "step_s": round(best, 4),
                      "tokens_per_s": round(BATCH * SEQ / best, 1)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
