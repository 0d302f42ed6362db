"""Backend choice shared by every kernel op: "auto" means the op's pick for this platform."""

from collections.abc import Callable, Mapping


def resolve(op: str, backend: str, backends: Mapping, auto: Callable[[], str]) -> str:
    """-> the backend name to run `op` with; raises naming the valid ones."""
    name = auto() if backend == "auto" else backend
    if name not in backends:
        valid = ", ".join(["auto", *backends])
        raise ValueError(f"unknown {op} backend {backend!r}; valid backends: {valid}")
    return name
