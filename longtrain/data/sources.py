"""Document sources, read as a stream: ``documents(cfg, skipped)`` yields (key, source, text).

- ``stdlib_code``: the Python standard library's own ``.py`` files, tests included (real
  code, dozens of files over 100K bytes; every machine with Python has it).
- ``local``: files matching a recursive glob: each ``.txt`` file is one document; each
  row of a ``.jsonl`` or ``.parquet`` file is one (its ``text_field``).
- ``hf``: a ``datasets`` dataset saved with ``save_to_disk`` (its train split), or one
  in the local cache, streamed.

A document's key is its path under the source's root (``.txt``/``.py``), the file plus
row (``rows.jsonl:3``), or the row number (``hf``). The train/val split is a pure
function of the key (a stable hash), never of the file order or the seed. Inputs that
are not text (empty or binary files, non-UTF-8 bytes, corrupt jsonl lines, rows without
the text field) are skipped and counted in ``skipped`` by reason; a missing column or an
unreadable parquet file is a one-line ``ConfigError``.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np

from longtrain.config import ConfigError, DataConfig

Split = Literal["train", "val"]


def in_val_split(key: str, val_percent: float) -> bool:
    # sha1 rather than hash(): Python salts str hashes per process, and the split must be
    # identical across runs, ranks and machines.
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h % 1_000_000 < val_percent * 10_000


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        # Third-party packages live under the stdlib folder; they are not the stdlib and
        # differ between machines. Pruning them also keeps the walk fast (torch alone is
        # thousands of files).
        if Path(folder) == root and "site-packages" in subfolders:
            subfolders.remove("site-packages")
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return root, sorted(files)


def _glob_root(pattern: str) -> Path:
    """The folder a glob pattern starts from, so keys don't depend on the cwd."""
    prefix = list(itertools.takewhile(lambda part: not glob.has_magic(part), Path(pattern).parts))
    root = Path(*prefix) if prefix else Path(".")
    return root if root.is_dir() else root.parent


def _decode_file(path: Path, skipped: Counter) -> Optional[str]:
    data = path.read_bytes()
    if not data:
        skipped["empty file"] += 1
        return None
    if b"\0" in data:  # text has no NUL bytes; images, archives and .pyc do
        skipped["binary file"] += 1
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        skipped["not UTF-8"] += 1
        return None


def input_files(data: DataConfig) -> tuple[Path, list[Path]]:
    """(root, files) of a file-based source, in a seeded order (documents of one folder
    would otherwise sit next to each other in every window)."""
    if data.source == "stdlib_code":
        root, files = stdlib_files()
    else:
        root = _glob_root(str(data.path))
        files = sorted(Path(p) for p in glob.glob(str(data.path), recursive=True) if Path(p).is_file())
        files = [p for p in files if p.suffix in (".txt", ".jsonl", ".parquet")]
        if not files:
            raise ConfigError(f"data.path: no .txt, .jsonl or .parquet file matches {data.path!r}")
    order = np.random.default_rng(data.seed).permutation(len(files))
    return root, [files[i] for i in order]


def _rows_of_file(path: Path, text_field: str, skipped: Counter) -> Iterator[tuple[int, str]]:
    """(row number, text) of each document in one file; a .txt or .py file is row 0."""
    if path.suffix in (".txt", ".py"):
        text = _decode_file(path, skipped)
        if text is not None:
            yield 0, text
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for row, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    skipped["corrupt jsonl line"] += 1
                    continue
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    skipped[f"jsonl row without a {text_field!r} string"] += 1
                    continue
                yield row, text
    else:  # .parquet, read a row group at a time
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise ConfigError(f"data.path: {path} is not a readable parquet file ({type(e).__name__})") from None
        if text_field not in pf.schema_arrow.names:
            raise ConfigError(f"data.text_field: {path} has no column {text_field!r}; columns are {pf.schema_arrow.names}")
        rows = itertools.chain.from_iterable(b.column(0).to_pylist() for b in pf.iter_batches(columns=[text_field]))
        yield from ((row, t) for row, t in enumerate(rows) if isinstance(t, str))


def _hf_rows(data: DataConfig) -> Iterator[str]:
    """A ``datasets`` dataset saved with ``save_to_disk`` (its train split), else one in
    the local cache, streamed."""
    import datasets

    path = str(data.path)
    if Path(path).is_dir() and any((Path(path) / f).exists() for f in ("dataset_dict.json", "state.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ConfigError(f"data.path: {path!r} has no 'train' split; splits are {list(ds)}")
            ds = ds["train"]
    else:
        try:
            ds = datasets.load_dataset(path, data.name, split="train", streaming=True)
        except Exception as e:  # offline cache misses surface as several exception types
            raise ConfigError(f"data.path: cannot load dataset {path!r} offline ({type(e).__name__})") from None
    columns = ds.column_names or []
    if data.text_field not in columns:
        raise ConfigError(f"data.text_field: no column {data.text_field!r}; columns are {columns}")
    for batch in ds.select_columns([data.text_field]).iter(batch_size=256):
        yield from batch[data.text_field]


def documents(data: DataConfig, skipped: Counter) -> tuple[list[str], Iterator[tuple[str, int, str]]]:
    """(source names, iterator of (key, source, text)) for the whole corpus, streamed."""
    if data.source == "hf":
        rows: Iterator[tuple[str, int, str]] = ((str(i), 0, t) for i, t in enumerate(_hf_rows(data)))
        return [str(data.path)], _nonempty(rows, skipped)
    root, files = input_files(data)
    names = [p.relative_to(root).as_posix() for p in files]
    keyed = (
        (name if path.suffix in (".txt", ".py") else f"{name}:{row}", source, text)
        for source, (path, name) in enumerate(zip(files, names))
        for row, text in _rows_of_file(path, data.text_field, skipped)
    )
    return names, _nonempty(keyed, skipped)


def _nonempty(rows: Iterator[tuple[str, int, str]], skipped: Counter) -> Iterator[tuple[str, int, str]]:
    for key, source, text in rows:
        if isinstance(text, str) and text:
            yield key, source, text
        else:
            skipped["empty document"] += 1


