"""vtrlab.data: synthetic organism tasks with ground-truth relevance (``synthetic``), JSONL
manifests and image folders (``manifest``).

    from vtrlab import data
    samples = data.generate(10, seed=0)              # Sample: image, question, answer, family, relevance
    records = data.read_manifest("my_data.jsonl")    # Record: image path, question, answer
"""

from .manifest import Record, read_image_folder, read_manifest, write_manifest
from .synthetic import FAMILIES, Sample, blank_like, generate, make_sample, relevance_from_mask

__all__ = [
    "FAMILIES", "Record", "Sample", "blank_like", "generate", "make_sample", "read_image_folder", "read_manifest",
    "relevance_from_mask", "write_manifest",
]
