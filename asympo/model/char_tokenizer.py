"""A character-level tokenizer in standard Hugging Face format.

One token per character of printable ASCII plus newline and tab, and four
special tokens. It is a ``tokenizers`` BPE model with no merges over GPT-2's
byte-level alphabet (space is ``Ġ``, newline ``Ċ``, tab ``ĉ``; other printable ASCII
is itself), with a byte-level pre-tokenizer and decoder: the form Qwen2 tokenizers
have. That matters because transformers 5 loads the tokenizer of a ``qwen2`` model
directory as ``Qwen2Tokenizer`` whatever tokenizer_config.json says, rebuilding the
pipeline from the vocabulary; with plain characters as token strings, spaces and
newlines were silently dropped (format 1 of the tiny model). Now ``AutoTokenizer``
and vLLM, with or without the model's config.json, encode one token per character
and decode the exact text.
Like Qwen tokenizers, encoding adds no special token: prompts are plain text.

It carries a Jinja chat template in Qwen's ChatML format (``<|im_start|>role\n...<|im_end|>``,
Qwen2.5's template without tools and without its default system prompt), so
``task.prompt_format=chat`` runs on the tiny model through the same
``apply_chat_template`` call as on a real instruct model. The markers are spelled in
characters (the vocabulary has no extra tokens), so the model's shape does not change.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
# Qwen2.5's ChatML template, tools and the default system prompt left out.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Printable ASCII (space through tilde), then newline and tab. Order fixes the ids.
CHARACTERS = (*(chr(c) for c in range(32, 127)), "\n", "\t")
assert set(CHARACTERS) >= set(string.digits + "+-*=#\n ")


def char_vocab() -> dict[str, int]:
    """Token string -> id: the special tokens first (ids 0-3), then one id per character."""
    tokens = list(SPECIAL_TOKENS) + list(CHARACTERS)
    return {tok: i for i, tok in enumerate(tokens)}


def _byte_level(ch: str) -> str:
    """GPT-2's byte-to-unicode symbol of an ASCII character (``" "`` -> ``"Ġ"``)."""
    code = ord(ch)
    return ch if 33 <= code <= 126 else chr(256 + code)  # control bytes and space shift up


def byte_level_vocab() -> dict[str, int]:
    """The tokenizer file's vocabulary: :func:`char_vocab` with byte-level token strings."""
    return {
        (tok if tok in SPECIAL_TOKENS else _byte_level(tok)): i for tok, i in char_vocab().items()
    }


def build_char_tokenizer() -> Tokenizer:
    """The raw ``tokenizers.Tokenizer``: byte-level BPE without merges = one token per char."""
    tok = Tokenizer(models.BPE(vocab=byte_level_vocab(), merges=[], unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_char_tokenizer(directory: str | Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to ``directory``.

    ``model_max_length`` is the context length the model was built with.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    build_char_tokenizer().save(str(out / "tokenizer.json"))
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
