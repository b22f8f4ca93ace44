"""Document sources: each returns a ``datasets.Dataset`` with ``text`` and ``id`` columns.

The train/val split is a pure function of each document's id (a stable hash), never of
the file order or the seed, so adding files, changing the seed or resuming on another
machine never moves a document between splits.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional

import datasets

from longtrain.config import ConfigError, DataConfig

Split = Literal["train", "val"]

# Split names that published datasets use for held-out data, in order of preference.
_HF_VAL_SPLITS = ("validation", "valid", "val")


def in_val_split(key: str, val_percent: float) -> bool:
    # sha1 rather than hash(): Python salts str hashes per process, and the split must be
    # identical across runs, ranks and machines.
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h % 1_000_000 < val_percent * 10_000


def _select(keys: Iterable[str], split: Split, val_percent: float, max_docs: Optional[int]) -> Iterator[int]:
    """Indices of the keys that fall in ``split``, stopping after ``max_docs``."""
    want_val = split == "val"
    picked = (i for i, key in enumerate(keys) if in_val_split(key, val_percent) == want_val)
    return itertools.islice(picked, max_docs)


def _stdlib_files() -> tuple[Path, list[Path]]:
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


def stdlib_code(split: Split, val_percent: float, max_docs: Optional[int] = None) -> datasets.Dataset:
    """The Python standard library's own ``.py`` files, tests included (they are real code).

    Every machine with Python has this corpus, so quick runs need no download. It holds
    dozens of files over 100K bytes (e.g. ``pydoc_data/topics.py``), enough for
    long-context stages on a laptop.
    """
    root, files = _stdlib_files()
    texts, ids = [], []
    want_val = split == "val"
    for path in files:
        key = path.relative_to(root).as_posix()
        # Decide the split before reading, so loading the small val split stays cheap.
        if in_val_split(key, val_percent) != want_val:
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a few test fixtures are deliberately mis-encoded
            continue
        if not text:  # empty __init__.py files would add nothing but BOS/EOS pairs
            continue
        texts.append(text)
        ids.append(key)
        if max_docs is not None and len(texts) == max_docs:
            break
    return datasets.Dataset.from_dict({"text": texts, "id": ids})


def _glob_root(pattern: str) -> Path:
    """The folder a glob pattern starts from, so ids don't depend on the cwd."""
    prefix = list(itertools.takewhile(lambda part: not glob.has_magic(part), Path(pattern).parts))
    root = Path(*prefix) if prefix else Path(".")
    return root if root.is_dir() else root.parent


def _text_column(ds: datasets.Dataset, text_field: str) -> datasets.Dataset:
    if text_field not in ds.column_names:
        raise ConfigError(f"data.text_field: no column {text_field!r}; columns are {ds.column_names}")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def local_files(pattern: str, text_field: str, split: Split, val_percent: float, max_docs: Optional[int] = None) -> datasets.Dataset:
    """Files matching a recursive glob: each ``.txt`` is one document; each row of a
    ``.jsonl`` or ``.parquet`` file is one document (its ``text_field``).

    A ``.txt`` document's id is its path under the glob's root. Rows have no natural
    name, so their id is the format plus the row index over the sorted files of that
    format (a new file moves only the rows of files that sort after it).
    """
    root = _glob_root(pattern)
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    by_ext = {ext: [str(p) for p in matches if p.suffix == ext] for ext in (".txt", ".jsonl", ".parquet")}
    if not any(by_ext.values()):
        raise ConfigError(f"data.path: no .txt, .jsonl or .parquet file matches {pattern!r}")

    parts = []
    if by_ext[".txt"]:
        # sample_by="document" yields exactly one row per file, in data_files order.
        ds = datasets.load_dataset("text", data_files=by_ext[".txt"], sample_by="document", split="train")
        ids = [Path(p).relative_to(root).as_posix() for p in by_ext[".txt"]]
        parts.append(ds.add_column("id", ids))
    for ext, builder in ((".jsonl", "json"), (".parquet", "parquet")):
        if by_ext[ext]:
            ds = _text_column(datasets.load_dataset(builder, data_files=by_ext[ext], split="train"), text_field)
            parts.append(ds.add_column("id", [f"{builder}:{i}" for i in range(len(ds))]))

    ds = datasets.concatenate_datasets(parts)
    return ds.select(list(_select(ds["id"], split, val_percent, max_docs)))


def hf_dataset(path: str, name: Optional[str], text_field: str, split: Split, val_percent: float, max_docs: Optional[int] = None) -> datasets.Dataset:
    """A Hugging Face dataset already in the local cache (or a local folder of data files).

    Uses the dataset's own validation split when it has one; otherwise holds out a hash
    split of ``train`` by row index. Set ``HF_HUB_OFFLINE=1`` so that ``datasets`` does
    not try to reach the Hub before falling back to its cache.
    """
    dd = datasets.load_dataset(path, name)
    if not isinstance(dd, datasets.DatasetDict):
        raise ConfigError(f"data.path: expected a dataset with splits, got {type(dd).__name__}")
    val_name = next((s for s in _HF_VAL_SPLITS if s in dd), None)
    if "train" not in dd:
        raise ConfigError(f"data.path: {path!r} has no 'train' split; splits are {list(dd)}")

    if val_name is not None:
        ds = _text_column(dd["train" if split == "train" else val_name], text_field)
        indices = range(len(ds) if max_docs is None else min(max_docs, len(ds)))
    else:
        ds = _text_column(dd["train"], text_field)
        indices = list(_select((str(i) for i in range(len(ds))), split, val_percent, max_docs))
    ds = ds.select(indices)
    return ds.add_column("id", [str(i) for i in indices])


def load_documents(cfg: DataConfig, split: Split) -> datasets.Dataset:
    """The documents of one split, with ``text`` and ``id`` columns, at most ``cfg.max_docs``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.source == "stdlib_code":
        return stdlib_code(split, cfg.val_percent, cfg.max_docs)
    if cfg.source in ("local", "hf") and not cfg.path:
        raise ConfigError(f"data.path: data.source={cfg.source} needs data.path")
    try:
        if cfg.source == "local":
            return local_files(str(cfg.path), cfg.text_field, split, cfg.val_percent, cfg.max_docs)
        if cfg.source == "hf":
            return hf_dataset(str(cfg.path), cfg.name, cfg.text_field, split, cfg.val_percent, cfg.max_docs)
    except ConfigError:  # our own checks name their key
        raise
    except Exception as e:  # datasets' builders fail in many ways on a bad file
        raise ConfigError(f"data.path: cannot read {cfg.path}: {_root_cause(e)}") from None
    raise ConfigError(f"data.source: unknown value {cfg.source!r}; valid: stdlib_code, local, hf")


def _root_cause(error: BaseException) -> str:
    """The innermost error's first line (datasets wraps the parser's own message)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first}"[:300]
