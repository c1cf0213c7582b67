"""Shared pieces of the TFDS builders: array_record output, build reports, decoding.

All builders here write ``array_record`` files and are read back with ``builder.as_data_source()``
(random access, no TensorFlow). ``tfds.load``/``as_dataset`` would need TensorFlow and are never
used. Examples are written in generation order (``disable_shuffling=True``): shuffling is the
loader's job (grain, from a seed), and a dataset that keeps file order is easier to audit.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import pathlib
from typing import Any, Mapping

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data.errors import DataError, DataReport, iter_jsonl

ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (TFDS's own default)."""
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """``DatasetInfo`` of a dataset built here, never published to TFDS's bucket.

    TFDS looks a fresh builder's metadata up in its public GCS bucket; the lookup needs the
    network, finds nothing for our datasets, and leaves an empty ``/tmp/tmp*tfds`` folder behind
    on every build (``tempfile.mkdtemp`` without a clean-up). Our builders skip it.
    """

    def initialize_from_bucket(self) -> None:
        return None


class RlhfBuilder(tfds.core.GeneratorBasedBuilder):
    """Base class: array_record output and a :class:`DataReport` of what generation skipped.

    Subclasses set ``name``/``VERSION``, implement ``_features()``, ``_split_generators`` and
    ``_generate_examples``, and count skips into ``self.report``. After ``download_and_prepare``
    the report is written next to the data as ``build_report.json``.
    """
    name = "rlhf_builder_base"
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9's default reaches for the `importlib_resources` backport, which Python >= 3.9
        # installs do not have; the file defining the builder is all it needs.
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, on_error: str = "raise", **kwargs):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        kwargs.setdefault("file_format", ARRAY_RECORD)
        self.on_error = on_error
        self.report = DataReport(name=self.name)
        super().__init__(**kwargs)

    def parsed_jsonl(self, path, label: str, parse):
        """``(lineno, where, example)`` for every line of a JSONL file that ``parse(obj, where)``
        accepts (``where = f"{label}:{lineno}"``); a ``DataError`` raises or is counted as a skip
        in ``self.report``, per ``on_error``."""
        for lineno, obj in iter_jsonl(path, report=self.report, on_error=self.on_error):
            where = f"{label}:{lineno}"
            try:
                ex = parse(obj, where)
            except DataError as e:
                if self.on_error == "raise":
                    raise
                self.report.skip_error(e, key=where)
                continue
            self.report.keep()
            yield lineno, where, ex

    def _features(self) -> tfds.features.FeaturesDict:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalDatasetInfo(builder=self, description=self.DESCRIPTION,
                                features=self._features(), disable_shuffling=True)

    def download_and_prepare(self, *args, **kwargs):
        existed = self.is_prepared()
        super().download_and_prepare(*args, **kwargs)
        if not existed:
            self.report.save(pathlib.Path(self.data_dir) / "build_report.json")

    def is_prepared(self) -> bool:
        return (pathlib.Path(self.data_dir) / "dataset_info.json").exists()


def prepare(builder: RlhfBuilder, *, download_config: tfds.download.DownloadConfig | None = None,
            verbose: bool = False) -> dict[str, Any]:
    """Builds ``builder`` if needed (idempotent) and returns ``{split: data_source}``.

    When the dataset was built in this call and something was skipped, the report summary is
    printed (``verbose`` prints it even when nothing was skipped).
    """
    built_now = not builder.is_prepared()
    builder.download_and_prepare(download_config=download_config)
    if built_now and (verbose or builder.report.num_skipped or builder.report.modified):
        print(builder.report.summary())
    return builder.as_data_source()


def decode(example: Mapping[str, Any]) -> dict[str, Any]:
    """A data-source example with ``bytes`` -> ``str`` and numeric sequences -> numpy arrays."""
    out = {}
    for k, v in example.items():
        out[k] = _decode_value(v)
    return out


def _decode_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, Mapping):
        return decode(v)
    if isinstance(v, (list, tuple)):
        if v and all(isinstance(x, bytes) for x in v):
            return [x.decode("utf-8") for x in v]
        return np.asarray(v)
    if isinstance(v, np.ndarray) and v.dtype == object:
        return [x.decode("utf-8") if isinstance(x, bytes) else x for x in v.tolist()]
    return v


def file_fingerprint(paths) -> str:
    """sha256 over the bytes of ``paths`` (sorted): identifies the source of a built dataset."""
    h = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
