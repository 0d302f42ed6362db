"""Training metrics: `workdir/metrics.jsonl` (one JSON object per logged step), TensorBoard event
files (tensorboardX), a PNG heatmap of expert load per MoE layer, loss and reward curves, and a
tqdm progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import tqdm
from absl import logging
from tensorboardX import SummaryWriter

POSTFIX = ("loss", "max_vio", "eval_accuracy", "reward_mean", "eval_reward")  # on the bar
HEATMAP_SECONDS = 60.0  # the expert-load PNG is redrawn at most this often (and at close)


class MetricsLogger:
    """Writes metrics of process 0. On resume, jsonl lines past the restored step are dropped so
    the file reads as one uninterrupted run."""

    def __init__(self, workdir: str | Path, *, start_step: int, total_steps: int,
                 enabled: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self.start_step, self.total_steps = start_step, total_steps
        self.bar = None  # from the first step's end: compilation stays out of its rate
        # Drawing the heatmap takes about half a second: at most every HEATMAP_SECONDS and at
        # close, from the newest load (every load still goes to the jsonl and TensorBoard).
        self.pending_load, self.heatmap_drawn = None, 0.0
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.workdir / "metrics.jsonl"
        _truncate_after(self.jsonl_path, start_step)
        self.tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        """`step` counts completed steps (1-based). Arrays: per-layer MaxVio and expert loads."""
        if not self.enabled:
            return
        record = {"step": step}
        for name, value in metrics.items():  # every scalar: losses, rates, eval_* results
            if np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number):
                record[name] = float(np.asarray(value))
        if "max_vio_per_layer" in metrics:
            record["max_vio_per_layer"] = np.asarray(metrics["max_vio_per_layer"]).round(4).tolist()
        if "expert_load" in metrics:
            load = np.asarray(metrics["expert_load"])
            record["expert_load"] = load.tolist()
            add_expert_histogram(self.tensorboard, load, step)
            self.pending_load = (load, step)
            if time.monotonic() - self.heatmap_drawn >= HEATMAP_SECONDS:
                self._draw_heatmap()
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step" and not isinstance(value, list):
                self.tensorboard.add_scalar(name, value, step)
        shown = {k: f"{record[k]:.4g}" for k in POSTFIX if k in record}
        if shown and self.bar is not None:
            self.bar.set_postfix(shown)

    def advance(self, steps: int = 1) -> None:
        if self.bar is None:
            self.bar = tqdm.tqdm(total=self.total_steps, initial=self.start_step + steps,
                                 disable=not self.enabled, dynamic_ncols=True, desc="train")
        else:
            self.bar.update(steps)

    def note(self, text: str) -> None:
        """A line of its own above the bar (process 0)."""
        if self.enabled:
            tqdm.tqdm.write(text)

    def _draw_heatmap(self) -> None:
        if self.pending_load is not None:
            load, step = self.pending_load
            write_load_heatmap(load, self.workdir / "expert_load.png", step)
            self.pending_load, self.heatmap_drawn = None, time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            self._draw_heatmap()
            self.tensorboard.close()


def _records(path: Path):
    """(line, record) for each JSON object line of `path`; a line cut short by a kill or a full
    disk is skipped with a warning."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logging.warning("%s:%d: dropping a partly written line", path, number)
            continue
        if isinstance(record, dict):
            yield line, record


def read_records(path: Path, up_to_step: int) -> list[dict]:
    """The records of a metrics.jsonl with a `step` <= `up_to_step` (none if it is missing)."""
    if not path.exists():
        return []
    return [r for _, r in _records(path) if r.get("step", up_to_step + 1) <= up_to_step]


def _truncate_after(path: Path, step: int) -> None:
    """Keeps the records up to `step`; a partly written line is dropped."""
    if not path.exists():
        return
    kept = [line for line, record in _records(path) if record.get("step", step + 1) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def add_expert_histogram(writer: SummaryWriter, load: np.ndarray, step: int) -> None:
    """The histogram of routed token copies over expert ids, from the [L, E] counts (summed over
    layers): one bucket per expert, never one sample per token (at GLM-4.5 scale a step routes
    ~1e10 copies)."""
    totals = load.astype(np.float64).sum(axis=0)  # [E]
    ids = np.arange(totals.shape[0], dtype=np.float64)
    used = np.nonzero(totals)[0]
    if not used.size:
        return
    writer.add_histogram_raw(
        "expert_load", min=float(used[0]), max=float(used[-1]), num=float(totals.sum()),
        sum=float(ids @ totals), sum_squares=float((ids ** 2) @ totals),
        bucket_limits=(ids + 0.5).tolist(), bucket_counts=totals.tolist(), global_step=step)


def write_load_heatmap(load: np.ndarray, path: Path, step: int) -> None:
    """Expert load per MoE layer relative to the mean (1.0 = perfectly balanced)."""
    relative = load / np.maximum(load.mean(axis=-1, keepdims=True), 1e-9)
    size = (min(16, max(4, load.shape[1] * 0.15 + 2)), min(12, max(2, load.shape[0] * 0.3 + 1)))
    fig, ax = _figure(size)  # capped: 89 layers x 160 experts stays 1600 x 1200 px
    image = ax.imshow(relative, aspect="auto", cmap="viridis")
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"expert load / mean, step {step}")
    fig.colorbar(image, ax=ax)
    _save_figure(fig, path)


def write_reward_curve(rows: list[dict], path: Path) -> None:
    """Held-out `eval_reward` (and `eval_reward_sampled` when logged) and the rollouts'
    `reward_mean` against the step."""
    fig, ax = _figure()
    _plot(ax, rows, {"reward_mean": dict(alpha=0.5, lw=1), "eval_reward": dict(marker="o"),
                     "eval_reward_sampled": dict(marker="s")})
    ax.set(xlabel="step", ylabel="reward", title="GRPO reward")
    ax.legend()
    _save_figure(fig, path)


def write_loss_curve(rows: list[dict], path: Path) -> None:
    """Training cross-entropy (next token, MTP) against the step, and held-out
    `eval_bits_per_byte` on a second axis when the rows have it."""
    fig, ax = _figure()
    _plot(ax, rows, {"ce_loss": dict(lw=1), "mtp_loss": dict(lw=1, alpha=0.5)})
    ax.set(xlabel="step", ylabel="nats per token", title="pre-training loss")
    lines = ax.get_lines()
    if any("eval_bits_per_byte" in r for r in rows):
        right = ax.twinx()
        _plot(right, rows, {"eval_bits_per_byte": dict(marker="o", color="tab:red")})
        right.set_ylabel("held-out bits per byte")
        lines += right.get_lines()
    ax.legend(lines, [line.get_label() for line in lines])
    _save_figure(fig, path)


def _figure(size=(6, 3.5)):
    """A bare matplotlib Figure, not pyplot's: no global backend switch, so a notebook that
    trains keeps its inline plots."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, fig.subplots()


def _plot(ax, rows: list[dict], styles: dict[str, dict]) -> None:
    """One line per metric named in `styles` that the rows hold (not all zero: an MTP loss
    without an MTP head), against the step."""
    for name, style in styles.items():
        points = [(r["step"], r[name]) for r in rows if name in r]
        if any(value for _, value in points):
            ax.plot(*zip(*points), label=name, **style)


def _save_figure(fig, path: Path) -> None:
    """Written beside `path` and renamed over it: a reader never sees a half-written PNG."""
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
