"""Backend choice shared by every kernel op: "auto" means the op's pick for this platform."""

import contextlib
from collections.abc import Callable, Iterator, Mapping

import jax

_TARGETS: list[str] = []


def platform() -> str:
    """The platform "auto" picks kernels for: JAX's backend, or inside `targeting(name)` the
    platform being compiled for ahead of time (e.g. a TPU topology on a CPU-only host)."""
    return _TARGETS[-1] if _TARGETS else jax.default_backend()


@contextlib.contextmanager
def targeting(name: str) -> Iterator[None]:
    """Within the block, "auto" picks the kernels of platform `name` ("tpu", "gpu", "cpu")."""
    _TARGETS.append(name)
    try:
        yield
    finally:
        _TARGETS.pop()


def resolve(op: str, backend: str, backends: Mapping, auto: Callable[[], str]) -> str:
    """-> the backend name to run `op` with; raises naming the valid ones."""
    name = auto() if backend == "auto" else backend
    if name not in backends:
        valid = ", ".join(["auto", *backends])
        raise ValueError(f"unknown {op} backend {backend!r}; valid backends: {valid}")
    return name
