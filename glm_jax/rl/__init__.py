"""Post-training: verifiable rewards, the evaluation harness, expert distillation, the GRPO
objectives, the pure `grpo_step`, rollouts with dynamic sampling, multi-turn episodes against
tool environments, and the loop (`glm_jax.rl.loop.grpo`)."""

from glm_jax.rl.agentic import (EpisodeStats, play_episodes, rollout_episodes,
                                rollout_with_environment)

from glm_jax.rl.curriculum import pick_temperature, select_hard_prompts
from glm_jax.rl.distill import select_for_distillation
from glm_jax.rl.environments import ENVIRONMENTS, CalculatorEnvironment, Environment
from glm_jax.rl.objectives import (aggregate_loss, group_advantages, k3_kl, overlong_penalty,
                                   token_policy_loss)
from glm_jax.rl.evaluate import bits_per_byte, evaluate_model, evaluate_tasks, pass_at_k
from glm_jax.rl.grpo import GrpoConfig, grpo_step, make_grpo_step
from glm_jax.rl.rewards import (REWARDS, RewardPool, code_reward, exact_match_reward,
                                function_call_reward, get_reward, math_reward)
from glm_jax.rl.rollouts import Groups, Overlong, collect_groups, rollout_groups

__all__ = ["ENVIRONMENTS", "CalculatorEnvironment", "Environment", "EpisodeStats", "GrpoConfig",
           "Groups", "Overlong", "REWARDS", "RewardPool", "aggregate_loss", "bits_per_byte",
           "code_reward", "collect_groups", "evaluate_model", "evaluate_tasks",
           "exact_match_reward", "function_call_reward", "get_reward", "grpo_step",
           "group_advantages", "k3_kl", "make_grpo_step", "math_reward", "overlong_penalty",
           "pass_at_k", "pick_temperature", "play_episodes", "rollout_episodes",
           "rollout_groups", "rollout_with_environment", "select_for_distillation",
           "select_hard_prompts", "token_policy_loss"]
