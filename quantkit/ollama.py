"""Ollama Modelfiles: FROM, a TEMPLATE derived from the HF chat template, stops, sampling defaults.

The HF chat template is Jinja; Ollama's is Go text/template. Rather than translate Jinja, we
render the HF template the way transformers does, on probe conversations, and read off the text
around the probe strings. Any template that puts fixed text between turns decomposes into

    {{ if .System }}SYS_PRE{{ .System }}SYS_POST{{ else }}DEFAULT_SYSTEM{{ end }}
    {{ range .Messages }}
      user:      USER_PRE{{ .Content }}USER_POST_AND_GENERATION_PROMPT
      assistant: {{ .Content }}ASSISTANT_POST
    {{ end }}

(written without the line breaks). That covers Llama 3.x (its "Cutting Knowledge Date" system
header included), ChatML, SmolLM2's default system prompt and Qwen3. Mistral's [INST] templates put
the system prompt inside the last user turn instead:

    PREFIX{{ range $i, $_ := .Messages }}
      user:      USER_PRE{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}SYS_SEP{{ end }}{{ .Content }}USER_POST
      assistant: {{ .Content }}ASSISTANT_POST
    {{ end }}

(Ollama's own Mistral template has that shape). A template that refuses a system prompt (Gemma 2's
raises an error) gets the first shape without its system part: Ollama's system prompt is dropped.
The decomposition is checked against a longer conversation. A template that does not fit any of
these gets no TEMPLATE line, and a comment says why.
The BOS token that llama.cpp adds itself (add_bos_token) is left out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .outputs import write_text_atomic

# generation_config.json key → Ollama PARAMETER name
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "repetition_penalty": "repeat_penalty", "min_p": "min_p"}

# probe strings: no whitespace (templates trim content), nothing a template would special-case
_SYS, _U1, _A1, _U2 = "QKPROBESYSTEM", "QKPROBEUSERONE", "QKPROBEASSISTANT", "QKPROBEUSERTWO"


class TemplateError(ValueError):
    """The chat template cannot be expressed as an Ollama template of the form above."""


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


@dataclass(frozen=True)
class ChatTemplate:
    """The HF chat template of a model directory and what it needs to render."""
    source: str
    bos_token: str | None
    eos_token: str | None
    add_bos: bool
    special_tokens: tuple[str, ...]     # added tokens marked special, longest first

    @classmethod
    def load(cls, model_dir: Path) -> ChatTemplate | None:
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
        src = cfg.get("chat_template")
        if isinstance(src, list):  # named templates: take the default
            src = next((t["template"] for t in src if t.get("name") == "default"), None)
        jinja = model_dir / "chat_template.jinja"
        if src is None and jinja.exists():
            src = jinja.read_text(encoding="utf-8")
        if not src:
            return None
        specials = [t["content"] for t in cfg.get("added_tokens_decoder", {}).values() if t.get("special")]
        add_bos = _adds_bos(model_dir, cfg)
        return cls(src, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")), add_bos,
                   tuple(sorted(set(specials), key=len, reverse=True)))

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        # the environment transformers' apply_chat_template uses
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.source).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _adds_bos(model_dir: Path, cfg: dict) -> bool:
    """Whether tokenizing a prompt adds BOS (then llama.cpp adds it, and the template must not)."""
    if "add_bos_token" in cfg:
        return bool(cfg["add_bos_token"])
    tok = model_dir / "tokenizer.json"
    if not tok.exists():
        return False
    post = json.loads(tok.read_text(encoding="utf-8")).get("post_processor") or {}
    procs = post.get("processors", [post])
    return any(p.get("type") == "TemplateProcessing" and p.get("single", [{}])[0].get("SpecialToken")
               for p in procs)


def _common_suffix(*texts: str) -> str:
    n = 0
    while all(len(t) > n for t in texts) and len({t[len(t) - 1 - n] for t in texts}) == 1:
        n += 1
    return texts[0][len(texts[0]) - n:] if n else ""


@dataclass(frozen=True)
class OllamaTemplate:
    sys_pre: str
    sys_post: str
    default_system: str
    user_pre: str
    user_post: str              # end of the user turn + the generation prompt
    assistant_post: str
    # where the system prompt goes: "first" (before the first turn), "last_turn" (Mistral: it opens
    # the last user turn; then sys_pre is unused, sys_post separates it from the turn's text, and
    # default_system is the text before the first turn) or "none" (the template refuses one)
    system: str = "first"

    def text(self) -> str:
        if self.system == "none":
            return (self.default_system + "{{ range .Messages }}"
                    + '{{ if eq .Role "user" }}' + self.user_pre + "{{ .Content }}" + self.user_post
                    + '{{ else if eq .Role "assistant" }}{{ .Content }}' + self.assistant_post
                    + "{{ end }}{{ end }}")
        if self.system == "last_turn":
            return (self.default_system + "{{ range $i, $_ := .Messages }}"
                    + '{{ if eq .Role "user" }}' + self.user_pre
                    + "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}" + self.sys_post
                    + "{{ end }}{{ .Content }}" + self.user_post
                    + '{{ else if eq .Role "assistant" }}{{ .Content }}' + self.assistant_post
                    + "{{ end }}{{ end }}")
        return ("{{ if .System }}" + self.sys_pre + "{{ .System }}" + self.sys_post
                + "{{ else }}" + self.default_system + "{{ end }}"
                + "{{ range .Messages }}"
                + '{{ if eq .Role "user" }}' + self.user_pre + "{{ .Content }}" + self.user_post
                + '{{ else if eq .Role "assistant" }}{{ .Content }}' + self.assistant_post
                + "{{ end }}{{ end }}")

    def render(self, system: str | None, turns: list[str]) -> str:
        """What Ollama renders for a system prompt and alternating user/assistant turns."""
        if self.system == "none":
            system = None
        if self.system == "last_turn":
            out = self.default_system
            for i, t in enumerate(turns):
                if i % 2:
                    out += t + self.assistant_post
                else:
                    last = system and i == len(turns) - 1
                    out += self.user_pre + (system + self.sys_post if last else "") + t + self.user_post
            return out
        out = self.sys_pre + system + self.sys_post if system else self.default_system
        for i, t in enumerate(turns):
            out += self.user_pre + t + self.user_post if i % 2 == 0 else t + self.assistant_post
        return out


def derive_template(chat: ChatTemplate) -> OllamaTemplate:
    """The Ollama template of the first shape above that reproduces the HF template, or a TemplateError."""
    first = None
    for system in ("first", "last_turn", "none"):
        try:
            return _derive(chat, system)
        except TemplateError as e:
            first = first or e
    raise first


def _derive(chat: ChatTemplate, system: str) -> OllamaTemplate:
    def render(msgs, gen=True):
        text = chat.render([{"role": r, "content": c} for r, c in msgs], gen)
        if chat.add_bos and chat.bos_token and text.startswith(chat.bos_token):
            text = text[len(chat.bos_token):]
        return text

    def between(text: str, *probes: str) -> list[str]:
        parts, pos = [], 0
        for p in probes:
            i = text.find(p, pos)
            if i < 0:
                raise TemplateError(f"the rendered conversation does not contain the message {p!r}")
            parts.append(text[pos:i])
            pos = i + len(p)
        return parts + [text[pos:]]

    if system == "last_turn":
        return _derive_system_in_last_turn(render, between)
    if system == "none":
        return _derive_without_system(render, between)
    sys_pre, sys_to_user, sys_tail = between(render([("system", _SYS), ("user", _U1)]), _SYS, _U1)
    default_to_user, tail = between(render([("user", _U1)]), _U1)
    hist = render([("system", _SYS), ("user", _U1), ("assistant", _A1), ("user", _U2)])
    h_pre, h_mid, user_to_asst, asst_to_user, h_tail = between(hist, _SYS, _U1, _A1, _U2)
    if (h_pre, h_mid, h_tail) != (sys_pre, sys_to_user, tail) or sys_tail != tail or user_to_asst != tail:
        raise TemplateError("turns are not rendered the same way in every position of a conversation")
    user_pre = _common_suffix(sys_to_user, default_to_user, asst_to_user)
    cut = len(user_pre)
    t = OllamaTemplate(sys_pre, sys_to_user[:len(sys_to_user) - cut], default_to_user[:len(default_to_user) - cut],
                       user_pre, tail, asst_to_user[:len(asst_to_user) - cut])
    return _checked(t, render, with_system=False)


def _derive_system_in_last_turn(render, between) -> OllamaTemplate:
    pre, tail = between(render([("user", _U1)]), _U1)
    pre2, sep, tail2 = between(render([("system", _SYS), ("user", _U1)]), _SYS, _U1)
    h_pre, user_to_asst, asst_to_user, h_sep, h_tail = between(
        render([("system", _SYS), ("user", _U1), ("assistant", _A1), ("user", _U2)]), _U1, _A1, _SYS, _U2)
    if not (pre == pre2 == h_pre and tail == tail2 == h_tail == user_to_asst and sep == h_sep):
        raise TemplateError("turns are not rendered the same way in every position of a conversation")
    user_pre = _common_suffix(pre, asst_to_user)
    t = OllamaTemplate("", sep, pre[:len(pre) - len(user_pre)], user_pre, tail,
                       asst_to_user[:len(asst_to_user) - len(user_pre)], system="last_turn")
    return _checked(t, render, with_system=True)


def _derive_without_system(render, between) -> OllamaTemplate:
    pre, tail = between(render([("user", _U1)]), _U1)
    h_pre, user_to_asst, asst_to_user, h_tail = between(render([("user", _U1), ("assistant", _A1), ("user", _U2)]),
                                                        _U1, _A1, _U2)
    if not (pre == h_pre and tail == h_tail == user_to_asst):
        raise TemplateError("turns are not rendered the same way in every position of a conversation")
    user_pre = _common_suffix(pre, asst_to_user)
    t = OllamaTemplate("", "", pre[:len(pre) - len(user_pre)], user_pre, tail,
                       asst_to_user[:len(asst_to_user) - len(user_pre)], system="none")
    return _checked(t, render, with_system=False)


def _checked(t: OllamaTemplate, render, with_system: bool) -> OllamaTemplate:
    # a longer conversation must come out the same
    turns = [_U1, _A1, _U2, _A1 + "X", _U2 + "Y"]
    msgs = [("user" if i % 2 == 0 else "assistant", c) for i, c in enumerate(turns)]
    for system in ([None, _SYS] if with_system else [None]):
        if t.render(system, turns) != render(([("system", system)] if system else []) + msgs):
            raise TemplateError("a five-turn conversation renders differently from the HF template")
    return t


def stop_tokens(chat: ChatTemplate, t: OllamaTemplate, eos: list[str]) -> list[str]:
    """The special tokens the template puts between turns, and the model's EOS tokens."""
    text = t.sys_pre + t.sys_post + t.user_pre + t.user_post + t.assistant_post
    found = [s for s in chat.special_tokens if s in text]
    return list(dict.fromkeys(found + [e for e in eos if e]))


def _eos_strings(model_dir: Path, chat: ChatTemplate) -> list[str]:
    gen = _json(model_dir / "generation_config.json")
    ids = gen.get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    vocab = {}
    tok = model_dir / "tokenizer.json"
    if ids and tok.exists():
        spec = json.loads(tok.read_text(encoding="utf-8"))
        vocab = {a["id"]: a["content"] for a in spec.get("added_tokens", [])}
    names = [vocab[i] for i in ids if i in vocab]
    return names or ([chat.eos_token] if chat.eos_token else [])


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def modelfile(gguf_name: str, model_dir: Path) -> str:
    lines = [f"FROM ./{gguf_name}", ""]
    chat = ChatTemplate.load(model_dir)
    if chat is None:
        lines.append("# the model has no chat template: Ollama will pass the raw prompt")
    else:
        try:
            t = derive_template(chat)
        except Exception as e:  # any template quirk: ship the file without a TEMPLATE, say why
            lines.append(f"# no TEMPLATE: the chat template could not be translated ({e})")
        else:
            lines += [f'TEMPLATE """{t.text()}"""', ""]
            lines += [f'PARAMETER stop "{s}"' for s in stop_tokens(chat, t, _eos_strings(model_dir, chat))]
    gen = _json(model_dir / "generation_config.json")
    if gen.get("do_sample", True) is not False:
        lines += [f"PARAMETER {name} {gen[key]}" for key, name in SAMPLING.items() if key in gen]
    return "\n".join(lines) + "\n"


def write_modelfiles(model_dir: Path, files: dict[str, Path]) -> list[Path]:
    """`NAME.Modelfile` next to each `NAME.gguf`, written atomically."""
    out = []
    for path in files.values():
        mf = path.with_name(path.stem + ".Modelfile")
        write_text_atomic(mf, modelfile(path.name, Path(model_dir)))
        out.append(mf)
    return out
