"""The built-in offline corpus: the Python standard library's own sources (~700 files, ~12 MB).

Each module is a code document (so FIM applies; `repo` is its top-level package, so repository
concatenation has real multi-file repos to join), and its docstrings and comment blocks are
natural-language documents. Both are sorted into quality buckets by the cheap heuristics that
web-scale pipelines also start from -- length, share of letters, line length, non-ASCII noise --
so the demo exercises the same bucket / epoch-cap machinery as a real corpus.

Every HELDOUT_EVERY-th module (in sorted order, the first included) is held out: its code goes
to `heldout.jsonl` and none of its text to the buckets, so bits per byte on it measure how well
a model trained on the buckets predicts stdlib code it never saw (`heldout_code`).

Built once into `out_dir` as `high.jsonl`, `medium.jsonl`, `low.jsonl`, `heldout.jsonl` plus
`manifest.json` (written last: its presence marks a complete build) and reused while the
manifest matches.
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import tokenize
from collections.abc import Iterator
from pathlib import Path

from absl import logging

BUCKETS = ("high", "medium", "low")
HELDOUT = "heldout"
HELDOUT_EVERY = 50  # 14 of the 686 modules of Python 3.12's stdlib (~180 KB of code)
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The standard library's `*.py` files, sorted, without test suites and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1])
             and not p.name.startswith("test_")]
    return files[:max_files] if max_files else files


def _letters(text: str) -> float:
    visible = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in visible) / max(len(visible), 1)


def _non_ascii(text: str) -> float:
    return sum(ord(c) > 127 for c in text) / max(len(text), 1)


def prose_quality(text: str) -> str:
    """Bucket of a docstring / comment: long, varied, clean prose is "high"; fragments and
    repetitive tables (few distinct words, as in Gopher's repetition filter) are "low"."""
    words = text.split()
    if (len(words) < 6 or _letters(text) < 0.6 or _non_ascii(text) > 0.05
            or len(set(words)) < 0.3 * len(words)):
        return "low"
    if len(text) >= 200 and _letters(text) >= 0.75 and _non_ascii(text) < 0.01:
        return "high"
    return "medium"


def code_quality(source: str, has_docstring: bool) -> str:
    """Bucket of a module: documented, readable code is "high"; tiny, table-like or long-lined
    (generated) files are "low"."""
    lengths = sorted(len(line) for line in source.splitlines()) or [0]
    p95 = lengths[int(0.95 * (len(lengths) - 1))]
    if len(source) < 300 or p95 > 120 or _letters(source) < 0.45 or _non_ascii(source) > 0.05:
        return "low"
    if has_docstring and p95 <= 90 and _non_ascii(source) < 0.01:
        return "high"
    return "medium"


def _comment_blocks(source: str) -> Iterator[str]:
    """Runs of comments on consecutive lines, `#` stripped, one block per run."""
    block, last_line = [], -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            line = tok.start[0]
            if line != last_line + 1 and block:
                yield "\n".join(block)
                block = []
            block.append(tok.string.lstrip("#").strip())
            last_line = line
    except (tokenize.TokenError, SyntaxError):
        pass
    if block:
        yield "\n".join(block)


def module_documents(path: Path, root: Path) -> Iterator[dict]:
    """The code document of one module, then its docstrings and comment blocks."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError) as e:
        logging.warning("stdlib corpus: skipped %s (%s)", path, e)
        return
    rel = path.relative_to(root).as_posix()
    repo = rel.split("/")[0].removesuffix(".py")
    has_docstring = ast.get_docstring(tree) is not None
    yield {"text": source, "is_code": True, "repo": repo, "path": rel,
           "bucket": code_quality(source, has_docstring)}
    nodes = (n for n in ast.walk(tree)
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    prose = [d for d in (ast.get_docstring(n) for n in nodes) if d]
    prose += list(_comment_blocks(source))
    for text in prose:
        if text.strip():
            yield {"text": text, "is_code": False, "path": rel, "bucket": prose_quality(text)}


def _is_built(out_dir: Path, key: dict) -> bool:
    manifest = out_dir / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("key") == key


def build_stdlib_corpus(out_dir: str | os.PathLike, *,
                        max_files: int | None = None) -> dict[str, str]:
    """Builds (or reuses) the corpus in `out_dir`; -> {bucket: jsonl path}. Safe when several
    processes build into one shared directory at once: the first complete build wins."""
    out_dir = Path(out_dir)
    paths = {b: str(out_dir / f"{b}.jsonl") for b in BUCKETS}
    key = {"python": sys.version, "max_files": max_files or 0, "heldout_every": HELDOUT_EVERY}
    if _is_built(out_dir, key):
        return paths
    root = Path(sysconfig.get_paths()["stdlib"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        counts = dict.fromkeys(BUCKETS + (HELDOUT,), 0)
        outs = {b: open(tmp / f"{b}.jsonl", "w", encoding="utf-8") for b in counts}
        with outs["high"], outs["medium"], outs["low"], outs[HELDOUT]:
            for i, path in enumerate(stdlib_files(max_files)):
                for doc in module_documents(path, root):
                    bucket = doc.pop("bucket")
                    if i % HELDOUT_EVERY == 0:
                        if not doc["is_code"]:
                            continue
                        bucket = HELDOUT
                    outs[bucket].write(json.dumps(doc, ensure_ascii=False) + "\n")
                    counts[bucket] += 1
        (tmp / "manifest.json").write_text(json.dumps({"key": key, "documents": counts}))
        tmp.chmod(0o755)  # mkdtemp makes it private
        if (out_dir / "manifest.json").exists():
            shutil.rmtree(out_dir)  # a stale build (other Python or max_files)
        try:
            os.replace(tmp, out_dir)
        except OSError as e:
            if not _is_built(out_dir, key):
                raise ValueError(f"{out_dir} exists and is not a stdlib corpus build") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logging.info("stdlib corpus -> %s: %s documents per bucket", out_dir, counts)
    return paths


def heldout_code(out_dir: str | os.PathLike, chars: int) -> str:
    """About `chars` characters of the held-out modules of a build in `out_dir`: an equal share
    from the start of each, cut at a line end, joined into one text (one shape to compile)."""
    path = Path(out_dir) / f"{HELDOUT}.jsonl"
    sources = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    if not sources:
        raise ValueError(f"{path}: no held-out module (the build has too few files)")
    share = chars // len(sources)
    return "\n".join(s[:share].rpartition("\n")[0] or s[:share] for s in sources)
