"""MoE kernels with swappable backends: grouped matmul, routing, permutation."""

from kernels.gmm import gmm
from kernels.routing import ExpertSort, replay_route, route, sort_by_expert, unsort

__all__ = ["ExpertSort", "gmm", "replay_route", "route", "sort_by_expert", "unsort"]
