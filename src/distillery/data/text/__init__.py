"""Text data for language-model distillation: corpus, tokenizers, formats, collators, a verifiable task.

- :mod:`~distillery.data.text.corpus`: the vendored Austen novels and their fixed splits.
- :mod:`~distillery.data.text.tokenizer`: byte-level BPE / byte tokenizers, cached, as HF fast tokenizers;
  the same-tokenizer check for teacher/student pairs.
- :mod:`~distillery.data.text.jsonl`: prompt/response pairs in JSONL.
- :mod:`~distillery.data.text.collate`: ``[bos] prompt response [eos]`` layouts, right padding for
  training, left padding for generation.
- :mod:`~distillery.data.text.dataset`: :class:`TokenDataset` for the training loop, packing of plain text.
- :mod:`~distillery.data.text.arithmetic`: arithmetic problems with exact-match verification.
- :mod:`~distillery.data.text.user`: the user's text, prompt/completion pairs and chats as training rows
  (chat templates, prompt masking, validation/test rows carved from the training rows).
- :mod:`~distillery.data.text.stream`: plain text streamed and packed on the fly.
- :mod:`~distillery.data.text.verifiers`: exact-match, regular-expression and user-function verifiers.
- :mod:`~distillery.data.text.wordnet`: WordNet 3.0 synsets (words, definitions, usage examples, the 45
  lexicographer files as labels) and its sentences as unlabelled text, from local files.

``transformers`` and ``tokenizers`` are imported only when a tokenizer is built or loaded.
"""

from distillery.data.text.arithmetic import ArithmeticConfig, ArithmeticTask, accuracy, solve, verify
from distillery.data.text.collate import (
    collate_pairs,
    collate_prompts,
    encode_pair,
    pad_left,
    pad_right,
    special_ids,
)
from distillery.data.text.corpus import (
    AUSTEN_SHA256,
    AUSTEN_TITLES,
    TextSplits,
    austen_novels,
    load_austen,
    split_austen,
    split_documents,
)
from distillery.data.text.dataset import TokenDataset, lm_datasets, pack_documents, pack_tokens
from distillery.data.text.jsonl import DataFormatError, PromptResponse, load_jsonl, write_jsonl
from distillery.data.text.stream import StreamedBlocks, TextStream
from distillery.data.text.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TokenizerConfig,
    check_tokenizers,
    load_tokenizer,
    same_tokenizer,
    save_training_tokenizer,
    tokenizer_cache_root,
    train_tokenizer,
)
from distillery.data.text.user import Example, carve, conversation, encode_examples
from distillery.data.text.verifiers import (
    ExactMatchVerifier,
    FunctionVerifier,
    RegexVerifier,
    VerifierConfig,
    build_verifier,
)
from distillery.data.text.wordnet import Synset, find_wordnet, load_synsets, wordnet_sentences

__all__ = [
    "AUSTEN_SHA256",
    "AUSTEN_TITLES",
    "DEFAULT_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "ArithmeticConfig",
    "ArithmeticTask",
    "DataFormatError",
    "ExactMatchVerifier",
    "Example",
    "FunctionVerifier",
    "PromptResponse",
    "RegexVerifier",
    "StreamedBlocks",
    "Synset",
    "TextSplits",
    "TextStream",
    "TokenDataset",
    "TokenizerConfig",
    "VerifierConfig",
    "accuracy",
    "austen_novels",
    "build_verifier",
    "carve",
    "check_tokenizers",
    "collate_pairs",
    "collate_prompts",
    "conversation",
    "encode_examples",
    "encode_pair",
    "find_wordnet",
    "lm_datasets",
    "load_austen",
    "load_jsonl",
    "load_synsets",
    "load_tokenizer",
    "pack_documents",
    "pack_tokens",
    "pad_left",
    "pad_right",
    "same_tokenizer",
    "save_training_tokenizer",
    "solve",
    "special_ids",
    "split_austen",
    "split_documents",
    "tokenizer_cache_root",
    "train_tokenizer",
    "verify",
    "wordnet_sentences",
    "write_jsonl",
]
