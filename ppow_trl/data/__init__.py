"""Data pipeline: prompt sources (including prompts the target writes itself), prompt filters and
decontamination, split, chat templating, target regeneration (cached), text corpora (cached token chunks
trained on the target's soft labels), training features.

Typical use::

    config = DataConfig(dataset_name="self_generated", self_generated_prompts=2000, max_turns=2)
    data = build_training_data(config, target, tokenizer)   # train/eval Datasets, draft vocab, report
    # + corpus text in the train split: DataConfig(..., corpus_name="pydoc_topics", corpus_max_tokens=65536)
    provider = make_feature_provider(config, data, target)  # online or offline target features
    batch = collate_sequences([data.train[i] for i in range(8)], tokenizer.pad_token_id)
    features = provider(batch)
"""

from .build import RegeneratedData, build_training_data, make_feature_provider, sanity_check
from .config import DataConfig
from .corpus import Corpus, CorpusSource, build_corpus, check_corpus_allowed, open_corpus
from .features import TargetFeatureProvider, collate_sequences
from .filters import ContaminationIndex, FilterSettings, filter_prompts
from .regeneration import Regeneration, batched_generate, regenerate, strip_generation
from .self_generated import TASK_TYPES, self_generated_prompts, write_prompts
from .sources import PROMPT_SOURCES, PromptExample, load_prompts, split_prompts, write_split

__all__ = [
    "PROMPT_SOURCES",
    "TASK_TYPES",
    "ContaminationIndex",
    "FilterSettings",
    "filter_prompts",
    "self_generated_prompts",
    "write_prompts",
    "Corpus",
    "CorpusSource",
    "DataConfig",
    "PromptExample",
    "RegeneratedData",
    "Regeneration",
    "TargetFeatureProvider",
    "batched_generate",
    "build_corpus",
    "build_training_data",
    "check_corpus_allowed",
    "collate_sequences",
    "load_prompts",
    "make_feature_provider",
    "open_corpus",
    "regenerate",
    "sanity_check",
    "split_prompts",
    "strip_generation",
    "write_split",
]
