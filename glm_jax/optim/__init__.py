"""GLM-4.5's pre-training optimizer: Muon + AdamW by parameter label, and its schedules."""

from glm_jax.optim.clipping import clip_by_global_norm
from glm_jax.optim.muon import muon, newton_schulz, param_labels, scale_by_muon
from glm_jax.optim.schedules import BatchSize, batch_size_schedule, warmup_cosine

__all__ = ["BatchSize", "batch_size_schedule", "clip_by_global_norm", "muon", "newton_schulz",
           "param_labels", "scale_by_muon", "warmup_cosine"]
