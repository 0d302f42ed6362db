"""Pre-training data on grain: sources, quality buckets, FIM, repo concatenation, tokenizer,
packing; `build_pipeline` puts them together."""

from glm_jax.data.corpus import build_stdlib_corpus, heldout_code
from glm_jax.data.fim import apply_fim, fim_permute
from glm_jax.data.mixture import Bucket, cap_epochs, mix_buckets
from glm_jax.data.packing import document_features, pack
from glm_jax.data.pipeline import (build_documents, build_pipeline, default_data_config,
                                   tokenizer_for)
from glm_jax.data.sources import BadRecordError, DocumentSource, RecordFormat
from glm_jax.data.tokenizer import (CODE_MIDDLE, CODE_PREFIX, CODE_SUFFIX, EOT, FILE_SEP,
                                    GLM_SPECIAL_TOKENS, encode_document, load_tokenizer, train_bpe)

__all__ = [
    "BadRecordError", "Bucket", "CODE_MIDDLE", "CODE_PREFIX", "CODE_SUFFIX", "DocumentSource",
    "EOT", "FILE_SEP", "GLM_SPECIAL_TOKENS", "RecordFormat", "apply_fim", "build_documents",
    "build_pipeline", "build_stdlib_corpus", "cap_epochs", "default_data_config",
    "document_features", "encode_document", "fim_permute", "heldout_code", "load_tokenizer",
    "mix_buckets", "pack", "tokenizer_for", "train_bpe",
]
