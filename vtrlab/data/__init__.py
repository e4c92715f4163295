"""vtrlab.data: synthetic organism tasks with ground-truth relevance (``synthetic``), JSONL
manifests and image folders (``manifest``)."""
