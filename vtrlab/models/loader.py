"""`load(model)`: the organism, a local directory or a hub id -> `VLM` (HF model + processor + adapter)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .registry import adapter_for
from .vlm import VLM

ORGANISM = "organism"
ORGANISM_ENV = "VTRLAB_ORGANISM"
REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class ModelLoadError(RuntimeError):
    """The model could not be found or fetched; the message is one line and says what to do."""


def organism_path() -> Path:
    """Where ``load("organism")`` looks: ``$VTRLAB_ORGANISM`` or ``<repo>/data/models/organism``."""
    env = os.environ.get(ORGANISM_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / "data" / "models" / "organism"


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(name))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so an offline machine fails in seconds, not after retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def resolve(model: str, cache_dir: str | None = None) -> tuple[str, bool]:
    """(path or hub id, local_files_only). Raises `ModelLoadError` with a one-line hint when the
    model cannot be had. A cached hub model loads from the cache when the hub is unreachable."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be 'organism', a local path or a hub id; got {type(model).__name__}")
    model = os.fspath(model)
    if model == ORGANISM:
        path = organism_path()
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"no organism at {path} (no config.json); train it or point ${ORGANISM_ENV} at a saved one "
                "(e.g. /tmp/vtrlab-organism-random)"
            )
        return str(path), True
    if _looks_local(model):
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{model!r} is not a model directory (no config.json there)")
        return str(path), True
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(model, "config.json", cache_dir=cache_dir), str)
    if _hub_reachable():
        return model, False
    if cached:
        return model, True
    raise ModelLoadError(
        f"cannot load {model!r}: the Hugging Face hub cannot be reached and the model is not in the local "
        "cache; pass a local path to a saved model directory instead"
    )


def _pick_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pick_dtype(dtype: str | torch.dtype, device: torch.device, config: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(saved, str):
            saved = DTYPES.get(saved)
        saved = saved or torch.float32
        # Half precision on CPU is slow and far from the float64 oracles: use float32 there.
        return torch.float32 if device.type == "cpu" else saved
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not understood; use 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load(
    model: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    device_map: str | dict | None = None,
    **kw: Any,
) -> VLM:
    """Load a VLM with its processor and family adapter.

    ``model``: ``"organism"`` (``$VTRLAB_ORGANISM`` or ``<repo>/data/models/organism``), a local
    directory, or a hub id. ``device="auto"`` picks CUDA when present. ``dtype="auto"`` keeps the
    checkpoint's dtype on GPU and uses float32 on CPU. ``device_map`` (e.g. ``"auto"``) spreads a
    model over several GPUs through accelerate; ``device`` is then ignored. Other keywords go to
    ``from_pretrained`` of the model (e.g. ``revision``).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    where, local_only = resolve(model, cache_dir=kw.get("cache_dir"))
    hub_kw = {k: kw[k] for k in ("revision", "token", "cache_dir", "trust_remote_code") if k in kw}
    if local_only:
        hub_kw["local_files_only"] = True
        kw = dict(kw, local_files_only=True)
    try:
        config = AutoConfig.from_pretrained(where, **hub_kw)
    except OSError as err:
        raise ModelLoadError(f"cannot read the config of {model!r}: {str(err).splitlines()[0]}") from err
    adapter = adapter_for(config.model_type)  # unsupported architectures fail here, before any weights load
    dev = _pick_device(device)
    torch_dtype = _pick_dtype(dtype, dev, config)
    cls = getattr(adapter, "model_class", None) or AutoModelForImageTextToText
    load_kw = dict(kw, dtype=torch_dtype, attn_implementation=attn_implementation)
    if device_map is not None:
        load_kw["device_map"] = device_map
    hf_model = cls.from_pretrained(where, **load_kw)
    if device_map is None:
        hf_model = hf_model.to(dev)
    hf_model.eval()
    processor = AutoProcessor.from_pretrained(where, **hub_kw)
    return VLM(model=hf_model, processor=processor, adapter=adapter, name=str(model))
