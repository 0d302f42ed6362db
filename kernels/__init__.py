"""MoE kernels with swappable backends: grouped matmul, routing, permutation."""

from kernels.gmm import gmm
from kernels.routing import ExpertSort, route, sort_by_expert, unsort

__all__ = ["ExpertSort", "gmm", "route", "sort_by_expert", "unsort"]
