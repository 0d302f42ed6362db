"""Post-training: verifiable rewards, the evaluation harness, expert distillation, and (next)
the GRPO objectives and loop."""

from glm_jax.rl.distill import select_for_distillation
from glm_jax.rl.objectives import (aggregate_loss, group_advantages, k3_kl, overlong_penalty,
                                   token_policy_loss)
from glm_jax.rl.evaluate import bits_per_byte, evaluate_model, evaluate_tasks, pass_at_k
from glm_jax.rl.rewards import (REWARDS, RewardPool, code_reward, exact_match_reward,
                                function_call_reward, get_reward, math_reward)

__all__ = ["REWARDS", "RewardPool", "aggregate_loss", "bits_per_byte", "code_reward",
           "evaluate_model", "evaluate_tasks", "exact_match_reward", "function_call_reward",
           "get_reward", "group_advantages", "k3_kl", "math_reward", "overlong_penalty",
           "pass_at_k", "select_for_distillation", "token_policy_loss"]
