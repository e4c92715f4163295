"""vtrlab.data: the data the notebooks read (``sources.load_data``: the organism, the photo set,
manifests, JSON/parquet files, image folders, saved Hugging Face datasets), synthetic organism
tasks (``synthetic``), ground truth per image token from pixel boxes and masks (``groundtruth``)
and VQA answer normalisation (``answers``).

    from vtrlab import data
    d = data.load_data("photos", n_samples=8, seed=0)    # Data: Records + identity (provenance)
    rec = d[0]                                           # Record: image, question, answers, boxes, mask, group, id
    cov = data.token_relevance(batch.layouts[0], rec)    # covered fraction of each image token's pixel box
    samples = data.generate(10, seed=0)                  # synthetic Sample: image, question, answer, pixel_mask, ...
"""

from .answers import accuracy, answer_accuracy, format_prompt, normalize_answer
from .groundtruth import relevant_tokens, token_coverage, token_relevance
from .manifest import Record, read_image_folder, read_manifest, write_manifest
from .sources import Data, export_organism, load_data
from .synthetic import FAMILIES, Sample, blank_like, generate, make_sample, relevance_from_mask

__all__ = [
    "FAMILIES",
    "Data",
    "Record",
    "Sample",
    "accuracy",
    "answer_accuracy",
    "blank_like",
    "export_organism",
    "format_prompt",
    "generate",
    "load_data",
    "make_sample",
    "normalize_answer",
    "read_image_folder",
    "read_manifest",
    "relevance_from_mask",
    "relevant_tokens",
    "token_coverage",
    "token_relevance",
    "write_manifest",
]
