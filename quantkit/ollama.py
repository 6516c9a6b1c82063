"""Ollama Modelfiles: FROM, a TEMPLATE translated from the HF chat template, stops, sampling defaults."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChatFamily:
    name: str
    marker: str          # a string that identifies the family in the Jinja chat template
    template: str        # Ollama (Go text/template) equivalent for system / user / assistant turns
    stops: tuple[str, ...]


FAMILIES = (
    ChatFamily(
        "llama3", "<|start_header_id|>",
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    ChatFamily(
        "chatml", "<|im_start|>",
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
        ("<|im_start|>", "<|im_end|>"),
    ),
)

# generation_config.json key → Ollama PARAMETER name
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "repetition_penalty": "repeat_penalty", "min_p": "min_p"}


def chat_family(chat_template: str | None) -> ChatFamily | None:
    if not chat_template:
        return None
    return next((f for f in FAMILIES if f.marker in chat_template), None)


def _chat_template(model_dir: Path) -> str | None:
    cfg = model_dir / "tokenizer_config.json"
    tpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template") if cfg.exists() else None
    if isinstance(tpl, list):  # named templates: take the default
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
    jinja = model_dir / "chat_template.jinja"
    if tpl is None and jinja.exists():
        tpl = jinja.read_text(encoding="utf-8")
    return tpl


def modelfile(gguf_name: str, model_dir: Path) -> str:
    lines = [f"FROM ./{gguf_name}", ""]
    family = chat_family(_chat_template(model_dir))
    if family is not None:
        lines += [f'TEMPLATE """{family.template}"""', ""]
        lines += [f'PARAMETER stop "{s}"' for s in family.stops]
    else:
        lines.append("# no chat template of a known family (Llama 3, ChatML): Ollama will use the raw prompt")
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.exists() else {}
    if gen.get("do_sample", True) is not False:
        lines += [f"PARAMETER {name} {gen[key]}" for key, name in SAMPLING.items() if key in gen]
    return "\n".join(lines) + "\n"


def write_modelfiles(model_dir: Path, files: dict[str, Path]) -> list[Path]:
    out = []
    for path in files.values():
        mf = path.with_name(path.stem + ".Modelfile")
        tmp = mf.with_name(f".{mf.name}.{os.getpid()}.partial")
        tmp.write_text(modelfile(path.name, Path(model_dir)), encoding="utf-8")
        os.replace(tmp, mf)
        out.append(mf)
    return out
