"""One entry point for every kind of data: ``load_data(data, ...) -> Data``.

``data`` is ``"organism"`` (synthetic samples with pixel-exact relevance), ``"photos"`` (the
scikit-image photo set shipped as ``data/photos/manifest.jsonl``) or a path to

- a JSONL manifest (``.jsonl``; see ``vtrlab.data.manifest``),
- a JSON file (``.json``: a list of row objects, or ``{"data": [...]}``),
- a parquet file (``.parquet``),
- a folder of pictures (with ``question=``),
- a Hugging Face dataset saved with ``save_to_disk`` (a folder holding ``dataset_info.json`` or
  ``dataset_dict.json``; needs the optional ``datasets`` package: ``pip install vtrlab[hf]``).

Column names are mapped by ``image_column``, ``question_column``, ``answer_column``,
``boxes_column``, ``mask_column``, ``group_column`` and ``id_column``; image values may be paths
(relative to the file's folder), encoded bytes, ``{"bytes", "path"}`` image features or decoded
pictures. ``n_samples`` and ``seed`` subsample reproducibly (the same rows for the same seed).
``Data.identity`` (path, content hashes, selection) goes into the provenance record of a run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vtrlab.data.manifest import (
    BOX_FORMATS,
    IMAGE_EXTENSIONS,
    Record,
    read_image_folder,
    record_from_row,
)

BUILTIN = ("organism", "photos")
FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


@dataclass
class Data:
    """Records plus where they came from (``identity``, for provenance)."""

    records: list[Record]
    identity: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, i):
        return self.records[i]

    @property
    def has_ground_truth(self) -> bool:
        """True when every record carries boxes or a mask."""
        return bool(self.records) and all(r.has_ground_truth for r in self.records)

    @property
    def has_answers(self) -> bool:
        return bool(self.records) and all(r.answers for r in self.records)

    @property
    def groups(self) -> list[str]:
        return [r.family for r in self.records]

    @property
    def images(self) -> LazyImages:
        """The pictures as a sequence read on access (a slice reads only its own pictures)."""
        return LazyImages(self.records)

    @property
    def questions(self) -> list[str]:
        return [r.question for r in self.records]

    def with_prompt(self, template: str = "{question}") -> Data:
        """The same data with each question wrapped in task instructions, e.g. ``"{question} Answer with
        a single word."`` (``vtrlab.data.answers.format_prompt``); the template joins the identity."""
        from vtrlab.data.answers import format_prompt

        if template == "{question}":
            return self
        records = [replace(r, question=format_prompt(r.question, template)) for r in self.records]
        return Data(records, {**self.identity, "prompt_template": template})

    def spread(self, n: int) -> list[Record]:
        """``n`` records cycling through the groups (first of each group, then the second, ...)."""
        by_group: dict = {}
        for r in self.records:
            by_group.setdefault(r.group, []).append(r)
        groups = list(by_group.values())
        out, k = [], 0
        while len(out) < n and any(k < len(g) for g in groups):
            out += [g[k] for g in groups if k < len(g)][: n - len(out)]
            k += 1
        return out

    def batches(self, batch_size: int) -> Iterator[tuple[int, list[Record]]]:
        """``(first index, records)`` chunks; pictures are read only when a chunk's records are used."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; must be a positive integer")
        for start in range(0, len(self.records), batch_size):
            yield start, self.records[start : start + batch_size]


class LazyImages(Sequence):
    """Pictures of records, read when indexed: memory stays bounded by the batch, not the dataset."""

    def __init__(self, records: Sequence[Record]):
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [r.image for r in self._records[i]]
        return self._records[i].image


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}; must be an integer >= {minimum}")


def subsample(n_total: int, n_samples: int | None, seed: int) -> np.ndarray:
    """Indices of the rows used: all when ``n_samples`` is None or ≥ ``n_total``, else a seeded
    random choice kept in source order."""
    if n_samples is None or n_samples >= n_total:
        return np.arange(n_total)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=n_samples, replace=False))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_array(h, value: np.ndarray) -> None:
    h.update(str((value.shape, value.dtype.str)).encode())
    h.update(np.ascontiguousarray(value).tobytes())


def content_hash(records: Sequence[Record]) -> str:
    """sha256 over what is analysed: each record's id, decoded RGB pixels, question, answers, group,
    boxes and mask (as read). Encoding-independent: the organism's samples and their exported
    manifest (PNG files) hash the same."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.id.encode() + b"\x00")
        _hash_array(h, np.asarray(r.image, dtype=np.uint8))
        h.update(json.dumps([r.question, list(r.answers), r.group, r.box_format]).encode())
        if r.boxes is not None:
            _hash_array(h, r.boxes.astype(np.float64))
        mask = r.pixel_mask
        if mask is not None:
            _hash_array(h, mask.astype(np.float64))
        h.update(b"\x01")
    return h.hexdigest()


def load_data(
    data: str | os.PathLike = "organism",
    *,
    n_samples: int | None = None,
    seed: int = 0,
    family: str | Sequence[str] | None = None,
    question: str | None = None,
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str | None = None,
    boxes_column: str = "boxes",
    mask_column: str = "mask",
    group_column: str | None = None,
    id_column: str = "id",
    box_format: str = "xyxy",
    split: str | None = None,
    root: str | os.PathLike | None = None,
    per_group: bool = False,
) -> Data:
    """Load ``data`` (see the module docstring) as ``Data``.

    ``family`` filters by group (the organism's task family, or a manifest's ``group``) before
    subsampling; "all" or None keeps everything. ``question`` is the question asked of every
    picture of an image folder (and replaces a missing question elsewhere). ``answer_column``
    None reads ``answers`` if present, else ``answer``. ``split`` picks one split of a saved
    ``DatasetDict``. ``per_group``: ``n_samples`` is drawn from each group (task family) instead of
    from the whole data (groups in order of first appearance). A relative path starts at ``root``
    when given (notebooks pass the project root, since their kernel runs in ``notebooks/``), else at
    the current directory.
    """
    if n_samples is not None:
        _check_int("n_samples", n_samples, 1)
    _check_int("seed", seed, 0)
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format={box_format!r}; accepted: {', '.join(BOX_FORMATS)}")
    families = None if family in (None, "all") else ([family] if isinstance(family, str) else list(family))
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data={data!r}; accepted: {', '.join(map(repr, BUILTIN))} or a path")
    if str(data) == "organism":
        return _organism(n_samples if n_samples is not None else 64, seed, families, per_group)
    columns = dict(
        image_column=image_column,
        question_column=question_column,
        answer_column=answer_column,
        boxes_column=boxes_column,
        mask_column=mask_column,
        group_column=group_column,
        id_column=id_column,
        box_format=box_format,
    )
    if str(data) == "photos":
        from vtrlab.data.photos import photos_manifest

        path = photos_manifest()
    else:
        path = Path(data).expanduser()
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        if not path.exists():
            raise FileNotFoundError(
                f"data={str(data)!r} does not exist; accepted: {', '.join(map(repr, BUILTIN))}, "
                "a .jsonl/.json/.parquet file, an image folder or a saved HF dataset folder"
            )
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            kind, rows, source_hash = "hf_dataset", None, None
        else:
            kind = "image_folder"
            if question is None:
                raise ValueError(f"data={str(data)!r} is an image folder: pass question= (asked of every picture)")
            records = read_image_folder(path, question)
            source_hash = hashlib.sha256(
                "\n".join(f"{r.id}:{os.path.getsize(r.image_source)}" for r in records).encode()
            ).hexdigest()
    else:
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise ValueError(
                f"data={str(data)!r}: unknown file type {path.suffix!r}; accepted: "
                f"{', '.join(FILE_KINDS)}, an image folder or a saved HF dataset folder"
            )
        source_hash = _sha256_file(path)
    if kind == "image_folder":
        pass
    elif kind == "hf_dataset":
        if per_group:
            raise ValueError("per_group=True is not supported for a saved Hugging Face dataset; pass family= instead")
        records, source_hash = _hf_records(path, split, families, n_samples, seed, columns)
    else:
        rows = _read_rows(path, kind)
        records = [
            record_from_row(row, base=path.parent, where=f"{path}:{i + 1}", default_id=str(i), **columns)
            for i, row in enumerate(rows)
        ]
    if kind != "hf_dataset":
        records = _select(records, families, n_samples, seed, str(data), per_group)
    if question is not None:
        for r in records:
            if r.question is None:
                r.question = question
    missing = [r.id for r in records if not r.question]
    if missing:
        raise ValueError(
            f"data={str(data)!r}: records {missing[:5]} have no question "
            f"(column {question_column!r}); pass question= or question_column="
        )
    identity = {
        "data": str(data),
        "kind": kind,
        "path": str(path.resolve()),
        "source_sha256": source_hash,
        "content_sha256": content_hash(records),
        "n_samples": len(records),
        "seed": seed,
        "family": family if family is None or isinstance(family, str) else ",".join(family),
        "per_group": per_group,
    }
    return Data(records, identity)


def _select(records: list[Record], families, n_samples, seed, data: str, per_group: bool = False) -> list[Record]:
    if families is not None:
        have = sorted({str(r.group) for r in records})
        unknown = [f for f in families if f not in have]
        if unknown:
            raise ValueError(f"family={unknown[0]!r} is not a group of data={data!r}; have: {', '.join(have)}")
        records = [r for r in records if r.group in families]
    if not per_group:
        return [records[i] for i in subsample(len(records), n_samples, seed)]
    out = []
    for g in dict.fromkeys(r.group for r in records):
        members = [r for r in records if r.group == g]
        out += [members[i] for i in subsample(len(members), n_samples, seed)]
    return out


def _read_rows(path: Path, kind: str) -> list[dict]:
    if kind == "jsonl":
        rows = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(row)
        return rows
    if kind == "json":
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
            raise ValueError(f'{path}: a JSON data file holds a list of row objects (or {{"data": [...]}})')
        return obj
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _hf_records(path: Path, split, families, n_samples, seed, columns) -> tuple[list[Record], str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"data={str(path)!r} is a saved Hugging Face dataset; reading it needs the `datasets` "
            "package: pip install 'vtrlab[hf]'"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise ValueError(f"{path} holds splits {sorted(ds)}; pass split=")
            split = next(iter(ds))
        if split not in ds:
            raise ValueError(f"split={split!r}; {path} holds: {', '.join(sorted(ds))}")
        ds = ds[split]
    elif split is not None:
        raise ValueError(f"split={split!r}, but {path} holds one dataset without splits")
    image_column = columns["image_column"]
    if image_column not in ds.column_names:
        raise ValueError(f"{path}: no column {image_column!r} (image_column); have {ds.column_names}")
    index = np.arange(len(ds))
    group_column = columns["group_column"] or next((c for c in ("group", "family") if c in ds.column_names), None)
    if families is not None:
        if group_column not in ds.column_names:
            raise ValueError(f"family= needs a group column; {path} has {ds.column_names}")
        groups = np.asarray([str(g) for g in ds[group_column]])
        unknown = [f for f in families if f not in set(groups)]
        if unknown:
            raise ValueError(f"family={unknown[0]!r} is not a group of {path}; have: {', '.join(sorted(set(groups)))}")
        index = index[np.isin(groups, families)]
    index = index[subsample(len(index), n_samples, seed)]
    meta_ds = ds.remove_columns([image_column]).select(index.tolist())
    records = []
    for j, (i, row) in enumerate(zip(index.tolist(), meta_ds)):
        row = dict(row)
        row[image_column] = _HFImage(ds, int(i), image_column)
        records.append(record_from_row(row, base=path, where=f"{path}[{i}]", default_id=str(i), **columns))
    fingerprint = getattr(ds, "_fingerprint", None) or hashlib.sha256(str(path).encode()).hexdigest()
    return records, str(fingerprint)


class _HFImage:
    """A dataset row's picture, decoded only when used (memory stays bounded as ``n_samples`` grows)."""

    def __init__(self, ds, index: int, column: str):
        self.ds, self.index, self.column = ds, index, column

    def __call__(self):
        value = self.ds[self.index][self.column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        from vtrlab.data.manifest import _open_rgb

        return _open_rgb(value)


def _organism(n_samples: int, seed: int, families, per_group: bool = False) -> Data:
    from vtrlab.data.synthetic import FAMILIES, generate

    if per_group:  # n_samples of each family: the same samples as generate(n_samples, seed, family=f)
        samples = [s for f in (families or FAMILIES) for s in generate(n_samples, seed=seed, family=f)]
    else:
        samples = generate(n_samples, seed=seed, family=families)
    records = [organism_record(s) for s in samples]
    identity = {
        "data": "organism",
        "kind": "organism",
        "path": None,
        "source_sha256": None,
        "content_sha256": content_hash(records),
        "n_samples": len(records),
        "seed": seed,
        "family": None if families is None else ",".join(families),
        "per_group": per_group,
    }
    return Data(records, identity)


def organism_record(s) -> Record:
    """A synthetic organism sample as a ``Record`` (its pixel mask is the ground truth)."""
    return Record(
        id=f"organism-{s.seed}-{s.index}-{s.family}",
        image_source=s.image,
        question=s.question,
        answers=(s.answer,),
        mask=np.asarray(s.pixel_mask, dtype=bool),
        group=s.family,
        relevance=np.asarray(s.relevance, dtype=bool),
        meta={"seed": s.seed, "index": s.index, "choices": s.choices, "object_mask": np.asarray(s.object_map) > 0},
    )  # all objects: the objectness control


def export_organism(
    folder: str | os.PathLike,
    n_samples: int = 64,
    seed: int = 0,
    family: str | Sequence[str] | None = None,
    per_group: bool = False,
) -> Path:
    """Write the organism samples ``load_data("organism", n_samples=..., seed=..., family=..., per_group=...)``
    returns as a manifest (PNG pictures, PNG pixel masks, object masks); returns the manifest path.

    With ``per_group`` (how notebooks 00, 03 and 04 draw samples) the manifest holds ``n_samples`` of each family;
    loading it with the same ``n_samples`` and ``per_group=True`` keeps every family's samples in order, so the
    notebooks see the samples ``data="organism"`` gives them."""
    from vtrlab.data.manifest import write_manifest
    from vtrlab.data.synthetic import FAMILIES, generate

    _check_int("n_samples", n_samples, 1)
    _check_int("seed", seed, 0)
    if not isinstance(per_group, bool):
        raise TypeError(f"per_group={per_group!r}; accepted: True or False")
    families = None if family in (None, "all") else ([family] if isinstance(family, str) else list(family))
    if per_group:
        samples = [s for f in (families or FAMILIES) for s in generate(n_samples, seed=seed, family=f)]
    else:
        samples = generate(n_samples, seed=seed, family=families)
    return write_manifest(samples, folder)


__all__ = [
    "BUILTIN",
    "IMAGE_EXTENSIONS",
    "Data",
    "content_hash",
    "export_organism",
    "load_data",
    "organism_record",
    "subsample",
]
