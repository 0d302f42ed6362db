"""Documents from jsonl / parquet / array_record files, as a random-access grain data source.

Written here rather than taken from grain: grain reads array_record (and parquet, sequentially)
but does not validate records, and jsonl not at all. Every file is scanned once when the source
is built; bad records (invalid JSON, missing or non-string text field, empty text) and unreadable
files are reported with file and line (jsonl, 1-based) or record index (parquet, array_record,
0-based), then skipped -- counted and logged once per file -- or raised, by `on_bad_record`.
Only the positions of good records are kept and texts are read again on access, so a source
costs memory per record, not per byte (parquet excepted: its needed columns stay in memory).

A record is a JSON object (a jsonl line, a UTF-8 array_record entry) or a parquet row with at
least the text field. Optional fields: the code flag (`code_field`; truthy marks source code),
and `repo` / `path`, used to concatenate the files of one repository into one document.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging

from glm_jax.data.tokenizer import FILE_SEP
from glm_jax.errors import InputError

_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
            ".array_record": "array_record", ".arecord": "array_record"}


class BadRecordError(InputError):
    """A record or file that cannot become a document; the message names its place."""


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """Field names of a record, and what to do with bad ones ("skip" or "raise")."""
    text_field: str = "text"
    code_field: str = "is_code"
    repo_field: str = "repo"
    path_field: str = "path"
    on_bad_record: str = "skip"

    def __post_init__(self):
        if self.on_bad_record not in ("skip", "raise"):
            raise ValueError(f"on_bad_record must be 'skip' or 'raise', got {self.on_bad_record!r}")

    @property
    def fields(self) -> tuple[str, ...]:
        return self.text_field, self.code_field, self.repo_field, self.path_field

    def problem(self, record: dict | BadRecordError) -> BadRecordError | None:
        """-> why `record` cannot be a document, or None when it can."""
        if isinstance(record, BadRecordError):
            return record
        text = record.get(self.text_field)
        if text is None:
            return BadRecordError(f"missing text field {self.text_field!r}")
        if not isinstance(text, str):
            return BadRecordError(
                f"text field {self.text_field!r} is {type(text).__name__}, not str")
        if not text.strip():
            return BadRecordError("empty document")
        return None


def _parse_json(raw: bytes) -> dict | BadRecordError:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return BadRecordError(f"invalid JSON ({e})")
    if not isinstance(record, dict):
        return BadRecordError(f"expected a JSON object, got {type(record).__name__}")
    return record


class _JsonlFile:
    def __init__(self, path: str, record_format: RecordFormat):
        del record_format
        self.path = path

    def scan(self) -> Iterator[tuple[Any, str, dict | BadRecordError]]:
        """-> (locator, place, record or why it is bad), one per record."""
        with open(self.path, "rb") as f:
            offset = 0
            for line_no, line in enumerate(f, 1):
                yield (offset, len(line)), f"{self.path}:{line_no}", _parse_json(line)
                offset += len(line)

    def read(self, locator) -> dict:
        offset, length = locator
        with open(self.path, "rb") as f:
            f.seek(offset)
            return json.loads(f.read(length))


class _ArrayRecordFile:
    def __init__(self, path: str, record_format: RecordFormat):
        del record_format
        from grain.sources import ArrayRecordDataSource  # needs the optional array_record package
        self.path = path
        self._source = ArrayRecordDataSource([path])

    def scan(self):
        for i in range(len(self._source)):
            yield i, f"{self.path}:record {i}", _parse_json(self._source[i])

    def read(self, locator) -> dict:
        return json.loads(self._source[locator])


class _ParquetFile:
    def __init__(self, path: str, record_format: RecordFormat):
        import pyarrow.parquet as pq
        self.path = path
        names = pq.read_schema(path).names
        self._table = pq.read_table(path, columns=[f for f in record_format.fields if f in names])

    def scan(self):
        for i in range(self._table.num_rows):
            yield i, f"{self.path}:record {i}", self.read(i)

    def read(self, locator) -> dict:
        return {name: self._table.column(name)[locator].as_py()
                for name in self._table.column_names}


_READERS = {"jsonl": _JsonlFile, "parquet": _ParquetFile, "array_record": _ArrayRecordFile}


def file_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMATS:
        raise ValueError(
            f"{path}: unknown data file type {ext!r}; expected one of {sorted(_FORMATS)}")
    return _FORMATS[ext]


class DocumentSource:
    """Random-access documents `{"text": str, "is_code": bool}` from a list of files.

    With `concat_repos`, records that share a repo become one document: their files in path
    order, each preceded by `<|file_sep|>PATH\\n`; records without a repo stay on their own.
    `skipped` maps each file with bad records (or unreadable) to how many were skipped.
    """

    def __init__(self, files: Sequence[str], *, record_format: RecordFormat = RecordFormat(),
                 is_code: bool = False, concat_repos: bool = False):
        self._format = record_format
        self._is_code = is_code
        self._concat_repos = concat_repos
        self._readers: list[Any] = []
        self.skipped: dict[str, int] = {}
        refs: list[tuple[int, Any, Any, str]] = []  # (reader, locator, repo, path) per document
        for path in files:
            reader_cls = _READERS[file_format(path)]
            try:
                reader = reader_cls(path, record_format)
                file_refs = [(len(self._readers), locator, repo, file_path)
                             for locator, repo, file_path in self._scan(reader)]
            except BadRecordError:
                raise
            except (OSError, ValueError, RuntimeError) as e:  # pyarrow / array_record errors
                if record_format.on_bad_record == "raise":
                    raise BadRecordError(f"{path}: unreadable data file ({e})") from e
                self.skipped[path] = 1
                logging.warning("%s: skipped the unreadable data file (%s)", path, e)
                continue
            self._readers.append(reader)
            refs.extend(file_refs)
        if concat_repos:
            self._items = _group_by_repo(refs)
        else:
            self._items = [[(r, locator)] for r, locator, _, _ in refs]

    def _scan(self, reader) -> Iterator[tuple[Any, Any, str]]:
        fmt, bad, first = self._format, 0, ""
        for locator, place, record in reader.scan():
            problem = fmt.problem(record)
            if problem is None:
                repo = record.get(fmt.repo_field) if self._concat_repos else None
                yield locator, repo, str(record.get(fmt.path_field) or "")
            elif fmt.on_bad_record == "raise":
                raise BadRecordError(f"{place}: {problem}")
            else:
                bad, first = bad + 1, first or f"{place}: {problem}"
        if bad:
            self.skipped[reader.path] = bad
            logging.warning("%s: skipped %d bad record(s); the first at %s",
                            reader.path, bad, first)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        fmt = self._format
        parts = [self._readers[r].read(locator) for r, locator in self._items[index]]
        is_code = self._is_code or any(bool(p.get(fmt.code_field)) for p in parts)
        if self._concat_repos and parts[0].get(fmt.repo_field) is not None:
            text = "".join(f"{FILE_SEP}{p.get(fmt.path_field) or ''}\n{p[fmt.text_field]}"
                           for p in parts)
        else:
            text = parts[0][fmt.text_field]
        return {"text": text, "is_code": is_code}


def _group_by_repo(refs):
    """Repos in order of first appearance, each one's files sorted by path."""
    groups: dict[Any, list] = {}
    for i, (reader, locator, repo, path) in enumerate(refs):
        key = ("repo", repo) if repo is not None else ("alone", i)
        groups.setdefault(key, []).append((path, reader, locator))
    return [[(r, locator) for _, r, locator in sorted(members, key=lambda m: m[0])]
            for members in groups.values()]
