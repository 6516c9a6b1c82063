"""Build the Mistral and Llama 2 tokenizer fixtures in tests/fixtures/tokenizers/ (run once; the output is committed).

    pip download --no-deps mistral-common -d /tmp/mc && unzip -q /tmp/mc/*.whl -d /tmp/mc
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/sd && tar -xzf /tmp/sd/*.tar.gz -C /tmp/sd
    pip install --target /tmp/mcdeps mistral-common protobuf      # transformers' Tekken converter needs them
    PYTHONPATH=/tmp/mcdeps python tools/make_tokenizer_fixtures.py /tmp/mc/mistral_common/data \\
        /tmp/sd/llama_cpp_python-0.3.36/vendor/llama.cpp/models

- mistral-v3/: Mistral 7B v0.3's tokenizer.model (mistral-common's `mistral_instruct_tokenizer_240323.model.v3`,
  32768 pieces); tokenizer.json as transformers converts that model; tokenizer_config.json in the form of the
  published Mistral-7B-Instruct-v0.3 (every control piece in added_tokens_decoder, special), with llama.cpp's
  `mistralai-Mistral-Nemo-Instruct-2407.jinja` [INST] chat template.
- mistral-v1/: Mistral 7B v0.1's tokenizer.model (`tokenizer.model.v1`, 32000 pieces), a base model's
  tokenizer_config.json (no chat template).
- llama-spm/: Llama 2's tokenizer.model rebuilt from llama.cpp's `models/ggml-vocab-llama-spm.gguf`
  (pieces, scores and types; Llama 2's normalizer: identity, dummy prefix, byte fallback), checked here to
  give llama.cpp's expected ids for its own test vectors, which are copied beside it.
- tekken/: Mistral Nemo's Tekken BPE (mistral-common's `tekken_240718.json`, 131072 tokens) as transformers'
  `convert_tekken_tokenizer` writes it, with the BOS template of the published Mistral-Nemo tokenizer.json
  (then it hashes as llama.cpp's `tekken` pre-tokenizer), xz-compressed (17 MB → 1.7 MB); the Nemo
  [INST] chat template.
"""
from __future__ import annotations

import json
import lzma
import shutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizers"


def hf_tokenizer(folder: Path, config: dict) -> None:
    """tokenizer.json as transformers converts tokenizer.model; then the given tokenizer_config.json."""
    from transformers import AutoTokenizer

    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    tmp = folder / "_hf"
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    shutil.move(tmp / "tokenizer.json", folder / "tokenizer.json")
    shutil.rmtree(tmp)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")


def decoder_entry(text: str) -> dict:
    return {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def base_config(**extra) -> dict:
    return {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
            "eos_token": "</s>", "legacy": False, "model_max_length": 1000000000000000019884624838656,
            "pad_token": None, "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
            "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False, **extra}


def mistral(data: Path, models: Path) -> None:
    import sentencepiece as spm

    d = OUT / "mistral-v3"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "mistral_instruct_tokenizer_240323.model.v3", d / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    special = {str(i): decoder_entry(sp.IdToPiece(i)) for i in range(sp.vocab_size())
               if sp.IsControl(i) or sp.IsUnknown(i)}
    template = (models / "templates" / "mistralai-Mistral-Nemo-Instruct-2407.jinja").read_text()
    hf_tokenizer(d, base_config(added_tokens_decoder=special, chat_template=template))

    d = OUT / "mistral-v1"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "tokenizer.model.v1", d / "tokenizer.model")
    hf_tokenizer(d, base_config(legacy=True, added_tokens_decoder={
        str(i): decoder_entry(t) for i, t in enumerate(["<unk>", "<s>", "</s>"])}))


def llama_spm(data: Path, models: Path) -> None:
    import gguf
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    ref = gguf.GGUFReader(models / "ggml-vocab-llama-spm.gguf")
    tokens = ref.fields["tokenizer.ggml.tokens"].contents()
    scores = ref.fields["tokenizer.ggml.scores"].contents()
    types = ref.fields["tokenizer.ggml.token_type"].contents()
    m = pb.ModelProto()
    m.ParseFromString((data / "tokenizer.model.v1").read_bytes())   # a Llama-2-era trainer/normalizer spec
    del m.pieces[:]
    for text, score, typ in zip(tokens, scores, types):
        m.pieces.add(piece=text, score=score, type=typ)   # GGUF's token types number SentencePiece's
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.trainer_spec.byte_fallback = True
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    m.normalizer_spec.precompiled_charsmap = b""
    d = OUT / "llama-spm"
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.model").write_bytes(m.SerializeToString())
    hf_tokenizer(d, base_config(added_tokens_decoder={
        str(i): decoder_entry(t) for i, t in enumerate(["<unk>", "<s>", "</s>"])}))
    for ext in ("inp", "out"):
        shutil.copyfile(models / f"ggml-vocab-llama-spm.gguf.{ext}", OUT / f"ggml-vocab-llama-spm.gguf.{ext}")
    # the rebuilt model must give llama.cpp's expected ids for its own vectors
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    inp = (models / "ggml-vocab-llama-spm.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")[:-1]
    out = [[int(x) for x in line.split()] for line in (models / "ggml-vocab-llama-spm.gguf.out").read_text().split("\n")]
    bad = [t for t, ids in zip(inp, out) if sp.encode(t) != ids]
    print(f"llama-spm: {len(inp) - len(bad)}/{len(inp)} test vectors as sentencepiece tokenizes them", bad[:3])


def tekken(data: Path, models: Path) -> None:
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    d = OUT / "tekken"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "_hf"
    convert_tekken_tokenizer(str(data / "tekken_240718.json")).save_pretrained(tmp)
    spec = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
    shutil.rmtree(tmp)
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    with lzma.open(d / "tokenizer.json.xz", "wt", encoding="utf-8", preset=9) as f:
        json.dump(spec, f, ensure_ascii=False)
    template = (models / "templates" / "mistralai-Mistral-Nemo-Instruct-2407.jinja").read_text()
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
         "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template}, indent=2) + "\n")


if __name__ == "__main__":
    data, models = Path(sys.argv[1]), Path(sys.argv[2])
    mistral(data, models)
    llama_spm(data, models)
    tekken(data, models)
