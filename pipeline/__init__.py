"""sftkit's data pipeline: read -> normalise -> dedup -> filter -> render+tokenize -> write.

Plain functions over Arrow tables and Parquet paths; no orchestration (that is ``flows/``).
"""

from __future__ import annotations

__all__ = ["SFTDataset", "create_sft_labels"]


def __getattr__(name: str):
    # Lazy so that `import pipeline.schema` does not pull in torch and transformers.
    if name in __all__:
        from pipeline import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
