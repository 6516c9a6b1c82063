"""HF tokenizer → GGUF vocabulary, the way convert_hf_to_gguf.py builds it.

Two kinds, chosen as the converter chooses for the Llama, Mistral and Qwen families: a SentencePiece
`tokenizer.model` if the folder has one (Mistral v0.x, Llama 2, TinyLlama: tokenizer.ggml.model
"llama", read with the `sentencepiece` wheel), else a byte-level BPE `tokenizer.json` (Llama 3, Qwen,
SmolLM: "gpt2", read with the `tokenizers` library; no transformers import on the export path).
gguf-py's SpecialVocab gives merges, special-token ids, add_bos/add_eos and the chat template.
"""
from __future__ import annotations

import json
import logging
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
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",     # Mistral-Nemo-Base-2407
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
    check_hash: str | None     # the pre-tokenizer hash (BPE only)
    scores: list[float] | None = None   # SentencePiece only


def _json_files(model_dir: Path) -> dict[str, dict]:
    """The tokenizer's JSON files that exist, parsed; one line naming the file if one is not a JSON object."""
    out = {}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        f = model_dir / name
        if not f.exists():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"not valid JSON ({e})", f) from None
        if not isinstance(data, dict):
            raise InputError(f"expected a JSON object, not {type(data).__name__}", f)
        out[name] = data
    return out


def load_vocab(model_dir: Path, vocab_size: int, sentencepiece_only: bool = False,
               added_tokens: str = "converter") -> Vocab:
    """The GGUF vocabulary of a model folder, padded to the config's vocab_size. `sentencepiece_only`:
    the family's converter reads nothing but a tokenizer.model (Gemma). `added_tokens`: whose rules
    type the added tokens of a SentencePiece vocabulary ("converter": the shared ones; "phi3": Phi-3's)."""
    files = _json_files(model_dir)
    if (model_dir / "tokenizer.model").exists():
        return _sentencepiece_vocab(model_dir, vocab_size, files, added_tokens)
    if sentencepiece_only:
        raise UnsupportedError("missing tokenizer.model: this family's vocabulary is read from its SentencePiece "
                               "model only (transformers 5 saves tokenizer.json alone: copy tokenizer.model from "
                               "the base model)", model_dir)
    path = model_dir / "tokenizer.json"
    if "tokenizer.json" not in files:
        raise InputError("missing tokenizer.json or tokenizer.model (needed for the GGUF vocabulary)", model_dir)
    spec = files["tokenizer.json"]
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind == "BPE" and model.get("byte_fallback"):
        # a SentencePiece vocabulary saved as tokenizer.json alone: the converter reads it with its
        # LlamaHfVocab, which quantkit does not reproduce
        raise UnsupportedError("a SentencePiece-style tokenizer.json (byte fallback) without its tokenizer.model "
                               "is not supported: copy tokenizer.model from the base model into the folder", path)
    if kind != "BPE":
        raise UnsupportedError(f"tokenizer model {kind!r} is not supported "
                               "(byte-level BPE tokenizer.json: Llama 3, Qwen, SmolLM; "
                               "or a SentencePiece tokenizer.model: Mistral, Llama 2)", path)
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

    special = _special_vocab(model_dir, load_merges=True)
    if not special.merges:
        raise InputError("tokenizer.json has no BPE merges", path)
    _bytelevel_defaults(special, spec)
    return Vocab("gpt2", pre, tokens, types, special, check_hash)


def _sentencepiece_vocab(model_dir: Path, vocab_size: int, files: dict[str, dict], rules: str) -> Vocab:
    """convert_hf_to_gguf.py's SentencePiece vocabulary: each piece with its score and type; then
    added_tokens.json (user-defined, score -1000) and tokenizer_config.json's added_tokens_decoder
    (control if marked special or shaped like a special token, else user-defined with its "▁" as
    spaces; score -1000) override their ids; ids the tokenizer lacks up to the config's vocab_size
    are unused "[PAD<id>]" pieces. Phi-3's converter ("phi3" rules) types an added token control only
    if marked special, keeps its "▁", and applies tokenizer.json's added_tokens the same way last."""
    path = model_dir / "tokenizer.model"
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UnsupportedError("reading a SentencePiece tokenizer.model needs the sentencepiece package "
                               "(pip install sentencepiece)", path) from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(path.read_bytes())
    except Exception as e:  # sentencepiece raises RuntimeError (or a protobuf parse error) on a bad file
        raise InputError(f"not a SentencePiece model ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                         path) from None
    n = sp.vocab_size()
    if n > vocab_size:
        raise InputError(f"tokenizer has {n} pieces but config.json's vocab_size is {vocab_size}", path)
    T = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [T.UNUSED] * vocab_size
    for i in range(n):
        tokens[i] = sp.IdToPiece(i)
        scores[i] = sp.GetScore(i)
        types[i] = (T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else
                    T.UNUSED if sp.IsUnused(i) else T.BYTE if sp.IsByte(i) else T.NORMAL)

    def check_id(i, source: str) -> int:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size:
            raise InputError(f"added token id {i!r} is outside config.json's vocab_size {vocab_size}",
                             model_dir / source)
        return i

    for text, i in files.get("added_tokens.json", {}).items():
        i = check_id(i, "added_tokens.json")
        tokens[i], scores[i], types[i] = text, -1000.0, T.USER_DEFINED
    added = [(key, entry, "tokenizer_config.json")
             for key, entry in files.get("tokenizer_config.json", {}).get("added_tokens_decoder", {}).items()]
    if rules == "phi3":
        added += [(a.get("id") if isinstance(a, dict) else None, a, "tokenizer.json")
                  for a in files.get("tokenizer.json", {}).get("added_tokens", [])]
    for key, entry, source in added:
        i = check_id(int(key) if str(key).isdigit() else key, source)
        text = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(text, str):
            raise InputError(f"added token {key!r} has no content", model_dir / source)
        if entry.get("special") or (rules != "phi3" and _looks_special(text)):
            types[i] = T.CONTROL
        else:
            if rules != "phi3":
                text = text.replace("\u2581", " ")   # llama.cpp wants user-defined pieces pre-normalized
            types[i] = T.USER_DEFINED
        tokens[i], scores[i] = text, -1000.0

    special = _special_vocab(model_dir, n_vocab=vocab_size)
    return Vocab("llama", "default", tokens, types, special, None, scores)


def _special_vocab(model_dir: Path, **kw) -> gguf.SpecialVocab:
    # gguf-py logs what it skips (a pair template's separator, a missing merges file) as warnings
    # meant for the converter's console; the export's output stays one progress bar
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(model_dir, **kw)
    finally:
        log.setLevel(level)


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
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    vocab.special.add_to_gguf(writer, quiet=True)
