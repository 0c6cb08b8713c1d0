"""A word-level tokenizer with one word per token id: the flows whose engines or benchmark tools load
a tokenizer from the model folder (MLC-LLM's engine, ``mlc_llm.bench``, ``trtllm-bench``) get one
without a download. A shared utility of the flows, not a flow."""

from __future__ import annotations

import json
from typing import Any

TOKENIZER = "tokenizer.json"


def tokenizer_json(vocab_size: int) -> dict[str, Any]:
    """A Hugging Face ``tokenizer.json`` with one word per token id: MLC's engine loads a tokenizer from
    the model folder (``Tokenizer::FromPath`` fails without one) and detokenizes every generated id,
    so all ``vocab_size`` ids must decode. Prompts are token ids, so nothing is ever encoded."""
    special = ["<unk>", "<s>", "</s>"]  # LLaMA's ids 0, 1, 2
    vocab = {(special[i] if i < len(special) else f"t{i}"): i for i in range(vocab_size)}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": {"type": "ByteFallback"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def hf_tokenizer_files(vocab_size: int, max_length: int) -> dict[str, str]:
    """``tokenizer.json`` and the ``tokenizer_config.json`` that lets transformers' ``AutoTokenizer``
    load it from a folder without a model ``config.json``: the benchmark tools (``mlc_llm.bench``,
    ``trtllm-bench``) tokenize through transformers. Word ``t<i>`` is token i, so a prompt of P
    space-separated words is P tokens."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "model_max_length": max_length,
    }
    return {TOKENIZER: json.dumps(tokenizer_json(vocab_size)), "tokenizer_config.json": json.dumps(config)}
