"""HF tokenizer → GGUF vocabulary, the way convert_hf_to_gguf.py builds it for BPE ("gpt2") vocabs.

Uses the `tokenizers` library directly (no transformers import on the export path) and gguf-py's
SpecialVocab for merges, special-token ids, add_bos/add_eos and the chat template.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf
from tokenizers import Tokenizer

from .errors import InputError, UnsupportedError

# llama.cpp names the pre-tokenizer by hashing the token ids of this text (convert_hf_to_gguf.py's
# `chktxt`); the hashes below are the ones its table maps to each name. Only pre-tokenizers of the
# families quantkit exports are listed: anything else is refused rather than guessed.
CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
    '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
    '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
    '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",      # Qwen3-Embedding-0.6B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM-135M
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # DeepSeek-R1-Distill-Qwen-1.5B
}


def _looks_special(token: str) -> bool:
    # convert_hf_to_gguf.py's does_token_look_special, for the token shapes of these families
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


@dataclass
class Vocab:
    model: str                 # tokenizer.ggml.model
    pre: str                   # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    special: gguf.SpecialVocab  # merges, special ids, add_bos/add_eos, chat template
    check_hash: str


def load_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise InputError("missing tokenizer.json (needed for the GGUF vocabulary)", model_dir)
    for f in (path, model_dir / "tokenizer_config.json", model_dir / "special_tokens_map.json"):
        if not f.exists():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"not valid JSON ({e})", f) from None
        if not isinstance(data, dict):
            raise InputError(f"expected a JSON object, not {type(data).__name__}", f)
        if f == path:
            spec = data
    kind = (spec.get("model") or {}).get("type")
    if kind != "BPE":
        raise UnsupportedError(f"tokenizer model {kind!r} is not supported "
                               "(only byte-level BPE tokenizers: Llama 3, Qwen, SmolLM)", path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise InputError(f"cannot load tokenizer ({e})", path) from None

    check_hash = sha256(str(tok.encode(CHECK_TEXT).ids).encode()).hexdigest()
    pre = KNOWN_PRE_TOKENIZERS.get(check_hash)
    if pre is None:
        raise UnsupportedError(f"unknown pre-tokenizer (check hash {check_hash}); llama.cpp would not know "
                               f"how to split text for it. Known: {', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))}",
                               path)

    vocab = tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise InputError(f"tokenizer has token id {max(vocab.values())} but config vocab_size is {vocab_size}", path)
    reverse = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}

    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            # llama.cpp assumes control / user-defined tokens are pre-normalized
            if not added[i].get("normalized", True):
                token = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].get("special") or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)

    special = gguf.SpecialVocab(model_dir, load_merges=True)
    if not special.merges:
        raise InputError("tokenizer.json has no BPE merges", path)
    _bytelevel_defaults(special, spec)
    return Vocab("gpt2", pre, tokens, types, special, check_hash)


def _bytelevel_defaults(special: gguf.SpecialVocab, spec: dict) -> None:
    # gguf-py 0.19 (PyPI) predates the converter's rule that a ByteLevel post-processor means
    # "no BOS/EOS added unless something else says so": apply it, so add_bos/add_eos are written
    # exactly as the current convert_hf_to_gguf.py writes them.
    post = spec.get("post_processor") or {}
    processors = post.get("processors", [post])
    if any(p.get("type") == "ByteLevel" for p in processors):
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)
        if processors[0].get("type") == "ByteLevel":
            # the converter sets them on meeting the ByteLevel step, before the template's: so
            # add_bos / add_eos come first in the file (values as already decided)
            rest = {k: v for k, v in special.add_special_token.items() if k not in ("bos", "eos")}
            special.add_special_token = {"bos": special.add_special_token["bos"],
                                         "eos": special.add_special_token["eos"], **rest}


def add_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    vocab.special.add_to_gguf(writer, quiet=True)
