"""`load(model)`: the organism, a local directory, a hub id or a built model (``scheme:name``) -> `VLM`.

``scheme:name`` models are built in code instead of read from a checkpoint: ``tiny:<family>`` (tiny random
weights) and ``full_size:<name>`` (real shapes, random weights), so notebooks and grids reach them through
their ``model`` parameter. Schemes are plugins: entry points of the group ``vtrlab.model_builders`` (vtrlab's own
two are declared in ``pyproject.toml`` and provided by ``vtrlab.testing``; this module imports none of them
by name). A builder is ``fn(name, *, device, dtype, attn_implementation) -> VLM``.
"""

from __future__ import annotations

import os
import re
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
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
_SCHEME = re.compile(r"^([a-z][a-z0-9_]*):(.+)$")
SCHEME_GROUP = "vtrlab.model_builders"  # entry-point group of model builders (``scheme:name`` models)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class ModelLoadError(RuntimeError):
    """The model could not be found or fetched; the message is one line and says what to do."""


class WeightsMismatchError(ModelLoadError):
    """The checkpoint's weights do not fit the model: missing, unexpected or of another shape."""


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
    if not _HUB_ID.match(model):
        raise ModelLoadError(
            f"{model!r} is neither 'organism', an existing local model directory, nor a hub id like 'org/name'"
        )
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


def model_schemes() -> dict[str, Any]:
    """``scheme -> entry point`` of the installed model builders (group ``vtrlab.model_builders``)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=SCHEME_GROUP)}


def scheme_of(model: Any) -> tuple[str, str] | None:
    """``(scheme, name)`` when ``model`` is a built model such as ``"tiny:llava"`` (and no local path of that
    name exists), else None."""
    if not isinstance(model, str) or os.path.exists(os.path.expanduser(model)):
        return None
    m = _SCHEME.match(model)
    return None if m is None else (m.group(1), m.group(2))


def _load_built(model: str, scheme: str, name: str, device, dtype, attn_implementation: str, kw: dict) -> VLM:
    """A ``scheme:name`` model from its builder (an entry point of group ``vtrlab.model_builders``)."""
    schemes = model_schemes()
    if scheme not in schemes:
        have = ", ".join(f"'{s}:<name>'" for s in sorted(schemes)) or "none installed"
        raise ModelLoadError(
            f"model={model!r}: no model builder {scheme!r} (entry-point group {SCHEME_GROUP!r}); accepted: "
            f"{have}, 'organism', a local model directory or a hub id (vtrlab's own 'tiny:' and 'full_size:' "
            "are registered when the package is installed: pip install -e .)"
        )
    extra = sorted(k for k, v in kw.items() if k != "device_map" or v is not None)
    if extra:
        raise ValueError(
            f"model={model!r} is built in code: it takes device=, dtype= and attn_implementation=, not {extra}"
        )
    dev = _pick_device(device)
    if isinstance(dtype, str) and dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not understood; use 'auto' or one of {sorted(DTYPES)}")
    torch_dtype = _pick_dtype(dtype, dev, None) if dtype != "auto" else None  # None: the builder's choice
    vlm = schemes[scheme].load()(name, device=dev, dtype=torch_dtype, attn_implementation=attn_implementation)
    vlm.name = model
    return vlm


def _pick_device(device: str | torch.device) -> torch.device:
    """The device to load onto, checked before anything is read: an unavailable one is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} not understood; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelLoadError(
                f"device {str(device)!r} requested but no CUDA GPU is available here; use 'cpu' or 'auto'"
            )
        if dev.index is not None and dev.index >= count:
            raise ModelLoadError(
                f"device {str(device)!r} requested but only {count} CUDA GPU(s) are visible (0..{count - 1})"
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device {str(device)!r} requested but MPS is not available here; use 'cpu' or 'auto'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r} not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


def check_files(path: str | os.PathLike) -> None:
    """Read the headers of a local checkpoint's files; a corrupt one is a ModelLoadError naming it.

    Every ``*.json`` must parse and every ``*.safetensors`` header must be complete (the header
    says how long the file is: a truncated file fails here, in milliseconds, before any weight
    is read).
    """
    import json

    folder = Path(path)
    for file in sorted(folder.glob("*.json")):
        try:
            json.loads(file.read_bytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{str(file)!r} is corrupt: not valid JSON ({str(exc).splitlines()[0]})") from None
    for file in sorted(folder.glob("*.safetensors")):
        try:
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # SafetensorError, OSError
            raise ModelLoadError(f"{str(file)!r} is corrupt: {str(exc).splitlines()[0]}") from None


def _name_keys(keys, limit: int = 5) -> str:
    keys = sorted(keys, key=str)
    text = ", ".join(keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_loading_info(info: dict[str, Any], model: str, strict: bool) -> None:
    """Missing / unexpected / mismatched weights: an error naming them (or a warning if not strict)."""
    problems = []
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    if missing:
        problems.append(f"{len(missing)} missing (randomly initialised): {_name_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (ignored): {_name_keys(unexpected)}")
    if info.get("mismatched_keys"):
        shown = [f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in info["mismatched_keys"]]
        problems.append(f"{len(shown)} of another shape (randomly initialised): {_name_keys(shown)}")
    if info.get("error_msgs"):
        problems.append("errors: " + "; ".join(str(m).splitlines()[0] for m in info["error_msgs"][:3]))
    if not problems:
        return
    text = f"weights of {model!r} do not fit the model: " + "; ".join(problems)
    if strict:
        raise WeightsMismatchError(text + " (pass strict=False to load anyway)")
    import warnings

    warnings.warn(text + " (loaded because strict=False)", RuntimeWarning, stacklevel=3)


def _pick_dtype(dtype: str | torch.dtype, device: torch.device, config: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point dtype; use 'auto' or one of {sorted(DTYPES)}")
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
    strict: bool = True,
    **kw: Any,
) -> VLM:
    """Load a VLM with its processor and family adapter.

    ``model``: ``"organism"`` (``$VTRLAB_ORGANISM`` or ``<repo>/data/models/organism``), a local
    directory, a hub id, or a model built in code: ``"tiny:<family>"`` (``vtrlab.testing.tiny``) or
    ``"full_size:<name>"`` (``vtrlab.testing.full_size``, e.g. ``"full_size:llava-1.5-7b"``; bfloat16 on a GPU
    unless ``dtype`` says otherwise). ``device="auto"`` picks CUDA when present. ``dtype="auto"`` keeps the
    checkpoint's dtype on GPU and uses float32 on CPU. ``device_map`` (e.g. ``"auto"``) spreads a
    model over several GPUs through accelerate; ``device`` is then ignored. Other keywords go to
    ``from_pretrained`` of the model (e.g. ``revision``).

    Loading is strict: weights missing from the checkpoint, unexpected ones and ones of another
    shape raise `WeightsMismatchError` naming them (``strict=False`` loads anyway, with a
    warning); a corrupt config, tokenizer or weights file raises `ModelLoadError` naming the
    file; an unavailable ``device`` fails before anything is read.
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    built = scheme_of(model)
    if built is not None:
        return _load_built(model, *built, device, dtype, attn_implementation, dict(kw, device_map=device_map))
    dev = _pick_device(device) if device_map is None else None
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    where, local_only = resolve(model, cache_dir=kw.get("cache_dir"))
    if local_only and Path(where).is_dir():
        check_files(where)
    hub_kw = {k: kw[k] for k in ("revision", "token", "cache_dir", "trust_remote_code") if k in kw}
    if local_only:
        hub_kw["local_files_only"] = True
        kw = dict(kw, local_files_only=True)
    try:
        config = AutoConfig.from_pretrained(where, **hub_kw)
    except OSError as err:
        raise ModelLoadError(f"cannot read the config of {model!r}: {str(err).splitlines()[0]}") from err
    adapter = adapter_for(config.model_type)  # unsupported architectures fail here, before any weights load
    torch_dtype = _pick_dtype(dtype, dev or torch.device("cuda"), config)
    cls = getattr(adapter, "model_class", None) or AutoModelForImageTextToText
    load_kw = dict(kw, dtype=torch_dtype, attn_implementation=attn_implementation, output_loading_info=True)
    load_kw.setdefault("ignore_mismatched_sizes", True)  # report mismatches ourselves, by name
    if device_map is not None:
        load_kw["device_map"] = device_map
    try:
        hf_model, info = cls.from_pretrained(where, **load_kw)
    except OSError as err:
        raise ModelLoadError(f"cannot read the weights of {model!r}: {str(err).splitlines()[0]}") from err
    check_loading_info(info, str(model), strict)
    if device_map is None:
        hf_model = hf_model.to(dev)
    hf_model.eval()
    try:
        processor = AutoProcessor.from_pretrained(where, **hub_kw)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the processor of {model!r}: {str(err).splitlines()[0]}") from err
    return VLM(model=hf_model, processor=processor, adapter=adapter, name=str(model))
