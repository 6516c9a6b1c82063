"""The `quantkit` command line: Click commands only; the work is in the library."""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from . import __version__
from .errors import InputError, QuantkitError, Terminated
from .outputs import check_out_dir, check_out_file


# optional libraries -> the extra that installs them (pyproject.toml)
_EXTRAS = {"transformers": "quant", "bitsandbytes": "quant", "compressed_tensors": "quant", "peft": "test",
           "llama_cpp": "bench", "matplotlib": "bench"}


def _terminate(signum, frame):
    raise Terminated()


def _quiet_libraries(quiet: bool) -> None:
    """--quiet silences the progress bars of the libraries we call too (transformers' weight loading,
    the Hub's), not only ours."""
    if not quiet:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"      # read when transformers is imported
    if sys.modules.get("transformers") is not None:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def one_line_errors(fn):
    """Turn QuantkitError, a disk full and any other error into one line on stderr and a non-zero
    exit; SIGTERM is handled as Ctrl-C is (the partial outputs are removed). QUANTKIT_DEBUG=1 shows
    the traceback of an unexpected error."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        in_main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, _terminate) if in_main else None
        try:
            return fn(*a, **kw)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except QuantkitError as e:
            click.echo(f"quantkit: error: {e}", err=True)
            sys.exit(e.exit_code)
        except BrokenPipeError:  # `quantkit ... | head`: the reader left, nothing to report
            sys.stderr.close()
            os._exit(1)
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            click.echo(f"quantkit: error: {where}{e.strerror or e}", err=True)
            sys.exit(1)
        except Terminated:
            click.echo("quantkit: terminated (SIGTERM); no partial output was kept", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("quantkit: interrupted; no partial output was kept", err=True)
            sys.exit(130)
        except ModuleNotFoundError as e:
            lib = (e.name or "").split(".")[0]
            if os.environ.get("QUANTKIT_DEBUG") or lib not in _EXTRAS:
                raise
            click.echo(f"quantkit: error: this needs {lib}, which is not installed: "
                       f"pip install 'quantkit[{_EXTRAS[lib]}]'", err=True)
            sys.exit(2)
        except Exception as e:
            if os.environ.get("QUANTKIT_DEBUG"):
                raise
            text = " ".join(str(e).split())
            click.echo(f"quantkit: error: {type(e).__name__}: {text[:400]} (unexpected: QUANTKIT_DEBUG=1 shows "
                       "where; please report it)", err=True)
            sys.exit(1)
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantkit")
def main():
    """Merge, quantize and benchmark fine-tuned LLMs.

    \b
    Example:
      quantkit export ./my-model --gguf q4_k_m,q5_k_m,q8_0 -o ./out
    """
    # gguf-py logs its tokenizer-parsing notes as warnings; they are not the user's problem
    logging.getLogger("gguf").setLevel(logging.ERROR)


def _group_size(ctx, param, value):
    if value is not None and value != -1 and value < 1:
        raise click.BadParameter(f"{value} is not a group size: -1 (one group per row) or a positive divisor "
                                 "of every input dimension")
    return value


def _damp(ctx, param, value):
    if value is not None and not 0 < value < float("inf"):        # NaN fails too
        raise click.BadParameter(f"{value} is not a dampening: a positive number, e.g. 0.01")
    return value


def _comma_list(ctx, param, value):
    if value is None:
        return None
    return [] if value.strip().lower() in ("", "none") else [v.strip() for v in value.split(",") if v.strip()]


def _layouts(ctx, param, value):
    # an empty list would silently mean "the default layouts": say which to give instead
    layouts = _comma_list(ctx, param, value)
    if layouts == []:
        raise click.BadParameter("give at least one layout: gptq, compressed-tensors")
    return layouts


# The flags of `export`, `run` and `merge`: each sets one key of the pipeline settings
# (pipeline_config.SCHEMA, the keys of pipeline.toml), from which `export` and `run` build the same steps;
# a flag wins over a pipeline file's value. Defaults are the schema's.
FLAGS = [
    (("--base",), "input", "base", dict(type=click.Path(path_type=Path), help="The HF model directory to ship.")),
    (("--lora",), "input", "lora", dict(multiple=True, type=click.Path(path_type=Path),
                                        help="PEFT LoRA adapter directory to merge (repeatable: applied in order).")),
    (("--weight",), "input", "lora_weights", dict(multiple=True, type=float,
                                                  help="Scale of each --lora, in the same order (default 1.0 each).")),
    (("--residual",), "input", "residual", dict(type=click.Path(path_type=Path),
                                                help="Full-rank residual checkpoint to add (from `quantkit residual extract`).")),
    (("--scale",), "input", "residual_scale", dict(type=float, help="Scale of --residual.")),
    (("--ignore-base-name",), "input", "ignore_base_name",
     dict(is_flag=True, default=None, help="Merge adapters whose base_model_name_or_path names another model.")),
    (("-o", "--out"), "output", "dir", dict(type=click.Path(path_type=Path), help="Output directory OUT.")),
    (("--device",), "output", "device", dict(help="auto, cpu or cuda[:N]: where to work.")),
    (("--gguf",), "gguf", "types", dict(callback=_comma_list, help="GGUF types, e.g. q4_k_m,q5_k_m,q8_0, or auto:q4_k_m / "
                                                                "auto:4.8 for a mix measured on the model (none: no GGUF; "
                                                                "export's default: these three unless only "
                                                                "--gptq/--int8/--nf4 are asked for). Types: "
                                                                "q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s, q5_1, "
                                                                "q5_0, q4_1, q4_0, iq4_nl, iq4_xs, bf16, f16.")),
    (("--ollama/--no-ollama",), "gguf", "ollama", dict(default=None, help="An Ollama Modelfile beside each GGUF.")),
    (("--imatrix",), "gguf", "imatrix", dict(help='Importance matrix for the K-quants, IQ4 and Q4/Q5 types: a file '
                                                  '(`quantkit imatrix`), or "auto" to make one.')),
    (("--name",), "gguf", "name", dict(help="Model name for general.name and the file names (default: from the "
                                            "model card and folder).")),
    (("--tensor-type",), "gguf", "tensor_types", dict(multiple=True, help=(
        "REGEX=TYPE: the type of the tensors whose GGUF name matches, in every quantized file, as llama-quantize's "
        "flag (repeatable; the first match wins), e.g. --tensor-type 'attn_v=q8_0'."))),
    (("--output-tensor-type",), "gguf", "output_tensor_type", dict(help="output.weight's type in the quantized files.")),
    (("--token-embedding-type",), "gguf", "token_embedding_type",
     dict(help="token_embd.weight's type in the quantized files.")),
    (("--pure",), "gguf", "pure", dict(is_flag=True, default=None,
                                       help="No mixture rules: every tensor not overridden gets the file's type.")),
    (("--auto-samples",), "gguf", "auto_samples",
     dict(type=click.IntRange(min=1), help="auto: types: calibration samples of the sensitivity pass "
                                           "[default: 4 on a CPU, 16 on a GPU].")),
    (("--auto-seqlen",), "gguf", "auto_seqlen",
     dict(type=click.IntRange(min=16), help="auto: types: tokens per sample [default: 256 on a CPU, 512 on a GPU].")),
    (("--gptq/--no-gptq",), "gptq", "enabled", dict(default=None, help="GPTQ checkpoints: OUT/gptq (AutoGPTQ v1) and "
                                                                       "OUT/gptq-ct (compressed-tensors).")),
    (("--bits",), "gptq", "bits", dict(type=click.Choice(["2", "4", "8"]), callback=lambda c, p, v: v and int(v),
                                       help="GPTQ bits.")),
    (("--group-size",), "gptq", "group_size", dict(type=int, callback=_group_size,
                                                   help="GPTQ group size (-1: one group per row); must divide every "
                                                        "input dimension.")),
    (("--sym/--asym",), "gptq", "sym", dict(default=None, help="GPTQ without / with zero points.")),
    (("--desc-act/--no-desc-act",), "gptq", "desc_act",
     dict(default=None, help="GPTQ act-order: quantize columns by decreasing Hessian diagonal.")),
    (("--static-groups/--dynamic-groups",), "gptq", "static_groups",
     dict(default=None, help="With act-order, keep groups as consecutive columns with scales from the original "
                             "weights (plain format); --dynamic-groups follows the act order and stores a permuted "
                             "g_idx.")),
    (("--damp",), "gptq", "damp", dict(type=float, callback=_damp, help="GPTQ dampening (x mean diag H).")),
    (("--gptq-method",), "gptq", "method", dict(type=click.Choice(["gptq", "rtn"]),
                                                help="rtn: round-to-nearest in the same format (the baseline GPTQ "
                                                     "should beat).")),
    (("--gptq-format",), "gptq", "formats", dict(callback=_layouts,
                                                 help="GPTQ layouts, comma-separated: gptq, compressed-tensors "
                                                      "(default: both; gptq alone with --dynamic-groups).")),
    (("--calib",), "gptq", "calib", dict(type=click.Path(path_type=Path),
                                         help="Calibration text (default: text the model generates itself). Never "
                                              "the eval text.")),
    (("--calib-samples",), "gptq", "calib_samples",
     dict(type=click.IntRange(min=1), help="Calibration samples [default: 128 on a GPU, 32 on a CPU].")),
    (("--calib-seqlen",), "gptq", "calib_seqlen",
     dict(type=click.IntRange(min=1), help="Tokens per sample [default: 2048 on a GPU, 512 on a CPU].")),
    (("--int8/--no-int8",), "bnb", "int8", dict(default=None, help="bitsandbytes LLM.int8 in OUT/int8.")),
    (("--nf4/--no-nf4",), "bnb", "nf4", dict(default=None, help="bitsandbytes NF4 with double quantization in OUT/nf4.")),
    (("--bench/--no-bench",), "bench", "enabled", dict(default=None, help="The report in OUT/report.")),
    (("--text",), "bench", "text", dict(type=click.Path(path_type=Path), help="Evaluation text.")),
    (("--ctx",), "bench", "ctx", dict(type=click.IntRange(min=1), help="Tokens per window.")),
    (("--limit-chunks",), "bench", "limit_chunks", dict(type=click.IntRange(min=0), help="Score the first N windows.")),
    (("--gpus",), "bench", "gpus", dict(callback=_comma_list, help="GPU tiers of the report, e.g. rtx4090,a100-40.")),
]


def _flag_name(decls: tuple[str, ...]) -> str:
    return decls[-1].split("/")[0]


def flag_options(*names: str, no_default: tuple[str, ...] = ()):
    """FLAGS as click options (parameter `section__key`), all of them or those named (e.g. "--lora"),
    their help ending with the schema's default (but for the flags in no_default)."""
    def decorate(fn):
        from .pipeline_config import SCHEMA
        for decls, section, key, kw in reversed(FLAGS):
            if names and _flag_name(decls) not in names:
                continue
            default = SCHEMA[section][key].default
            if isinstance(default, list):
                default = ",".join(default)
            if default not in (None, "", 0) and not isinstance(default, bool) and "[default" not in kw["help"] \
                    and _flag_name(decls) not in no_default:
                kw = {**kw, "help": f"{kw['help']} [default: {default}]"}
            fn = click.option(*decls, f"{section}__{key}", **kw)(fn)
        return fn
    return decorate


def _overrides(flags: dict) -> dict:
    """{(section, key): (value, flag)} of the FLAGS given on the command line."""
    out = {}
    for decls, section, key, _ in FLAGS:
        value = flags.get(f"{section}__{key}")
        if value is None or value == ():
            continue
        out[(section, key)] = (list(value) if isinstance(value, tuple) else value, _flag_name(decls))
    return out


EXPORT_FLAGS = ("--gguf", "--ollama", "--imatrix", "--name", "--tensor-type", "--output-tensor-type",
                "--token-embedding-type", "--pure", "--auto-samples", "--auto-seqlen", "--lora", "--weight", "--residual", "--scale",
                "--ignore-base-name", "--gptq", "--bits", "--group-size", "--sym", "--desc-act", "--static-groups",
                "--damp", "--gptq-method", "--gptq-format", "--calib", "--calib-samples", "--calib-seqlen", "--int8",
                "--nf4", "--device", "--out")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@flag_options(*EXPORT_FLAGS, no_default=("--out", "--gguf"))
@click.option("--dry-run", is_flag=True, help="Print the per-tensor type plan and exit without reading weights.")
@click.option("--force", is_flag=True, help="Replace existing OUT/gptq, OUT/int8 ... directories.")
@click.option("--stats", type=click.Path(path_type=Path),
              help="Write the GGUF export's wall time, peak RSS and peak GPU memory to this JSON file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@one_line_errors
def export(model, dry_run, force, stats, quiet, **flags):
    """Export a HF model directory to GGUF files (all types in one pass), GPTQ and bitsandbytes checkpoints.

    Reads each tensor of MODEL (config.json + safetensors + tokenizer.json) once and writes one
    GGUF per requested type, byte-identical to convert_hf_to_gguf.py + llama-quantize. With --lora
    or --residual the merge happens on the fly: the same tensors as `quantkit merge` then export,
    with no merged copy on disk (the files are named after MODEL; --name names the fine-tune).
    --gptq quantizes layer by layer with GPTQ on calibration text; --int8 / --nf4 go through
    bitsandbytes. Everything every output needs is checked before the first one starts. The steps
    are `quantkit run`'s, with the files straight in OUT and no manifest.

    \b
    Examples:
      quantkit export ./my-model --gguf q4_k_m,q5_k_m,q8_0 -o ./out
      quantkit export ./my-model --gguf q4_k_m --dry-run        # show the type of every tensor
      quantkit export ./my-model --gguf q8_0 --ollama -o ./out  # plus out/<name>-Q8_0.Modelfile
      quantkit export ./base --lora ./adapter --gguf q4_k_m -o ./out
      quantkit export ./my-model --gguf q4_k_m --imatrix imatrix.gguf -o ./out
      quantkit export ./my-model --gguf auto:q4_k_m --imatrix imatrix.gguf -o ./out  # measured mix, Q4_K_M's size
      quantkit export ./my-model --gptq --group-size 128 --int8 --nf4 -o ./out   # out/gptq, gptq-ct, int8, nf4
    """
    _quiet_libraries(quiet)
    from . import pipeline as pl
    from .pipeline_config import parse

    overrides = _overrides(flags)
    others = any(flags[k] for k in ("gptq__enabled", "bnb__int8", "bnb__nf4"))
    if flags["gguf__types"] == [] and not others:
        raise click.UsageError("--gguf is empty: name the types (q8_0, q4_k_m, ...: see --help), or leave it out")
    if flags["gguf__types"] is None and others:
        overrides[("gguf", "types")] = ([], "--gguf")          # GPTQ / bitsandbytes alone: no GGUF unless asked
    overrides[("input", "base")] = (model, "MODEL")
    overrides.setdefault(("gguf", "ollama"), (False, "--ollama"))
    overrides[("bench", "enabled")] = (False, "")
    if flags["output__dir"] is None and not dry_run:
        raise click.UsageError("missing option '-o' / '--out' (the output directory)")
    if stats is not None:
        check_out_file(stats, model)
    cfg = parse(None, overrides)
    try:
        dev = _resolve_device(cfg["output"]["device"], flag="", dry_run=dry_run)
    except QuantkitError as e:
        raise cfg.error("output", "device", str(e)) from None
    if dry_run:
        if cfg["gguf"]["types"]:
            from .export import export_gguf
            from .plan import parse_variants
            imatrix = cfg["gguf"]["imatrix"]         # the plan knows whether one is given ("auto" too)
            export_gguf(pl.source(cfg, dev), parse_variants(",".join(cfg["gguf"]["types"])), None, dry_run=True,
                        imatrix=Path(imatrix) if imatrix else None, overrides=pl.overrides(cfg["gguf"]),
                        auto=pl.auto_settings(cfg), device=dev, progress=not quiet)
        return
    plan = pl.build(cfg, dev, progress=not quiet, mode=pl.EXPORT, force=force)

    def report(step):
        if step.name == "gguf":
            res = plan.results["gguf"]
            for v, path in res.files.items():
                click.echo(f"{v.upper():8} {path.stat().st_size / 2**20:10.1f} MiB  {path}")
            click.echo(f"done in {res.seconds:.1f} s; details in {plan.out / 'export.json'}")
            if stats:
                _write_stats(stats, res.seconds, dev)
        elif step.name == "gptq":
            for fmt, d in plan.results["gptq"].items():
                click.echo(f"{'GPTQ' if fmt == 'gptq' else 'GPTQ-CT':8} {_dir_mib(d):10.1f} MiB  {d}")
        elif step.name in ("int8", "nf4"):
            d = plan.results[step.name]
            click.echo(f"{step.name.upper():8} {_dir_mib(d):10.1f} MiB  {d}")
    pl.execute(plan, report)


def _dir_mib(d: Path) -> float:
    return sum(p.stat().st_size for p in Path(d).glob("*.safetensors")) / 2**20


@main.command("imatrix")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_file", type=click.Path(path_type=Path), required=True,
              help="The imatrix GGUF to write, e.g. imatrix.gguf.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration text (default: text the model generates itself). Never the evaluation text.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=64, show_default=True, help="Samples (chunks).")
@click.option("--calib-seqlen", type=click.IntRange(min=16), default=512, show_default=True, help="Tokens per sample.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]: where the model runs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@one_line_errors
def imatrix_cmd(model, out_file, calib, calib_samples, calib_seqlen, device, quiet):
    """Compute the importance matrix of MODEL, as llama-imatrix does, for `export --imatrix`.

    Runs the bf16 model (transformers, one decoder layer at a time, on the GPU if present) over the
    calibration text and records, for every linear layer, the sum of each input column's squared
    activations and the token count (their ratio is the importance). The file is llama.cpp's imatrix
    GGUF: llama-quantize --imatrix reads it too.

    \b
    Examples:
      quantkit imatrix ./my-model -o imatrix.gguf
      quantkit imatrix ./my-model --calib my-domain-text.txt --calib-samples 128 -o imatrix.gguf
      quantkit export ./my-model --gguf q4_k_m --imatrix imatrix.gguf -o ./out
    """
    _quiet_libraries(quiet)
    from .imatrix import collect, write
    check_out_file(out_file, model)
    im = collect(model, calib=calib, n_samples=calib_samples, seqlen=calib_seqlen, device=_resolve_device(device),
                 progress=not quiet)
    write(im, out_file)
    click.echo(f"wrote {out_file}: {len(im.sums)} tensors, {im.chunk_count} x {im.chunk_size} tokens")


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@flag_options("--lora", "--weight", "--residual", "--scale", "--ignore-base-name")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Output model directory (must not exist, or be empty, unless --force).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="Dtype of the merged weights.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest shard, e.g. 5GB, 500MB.")
@click.option("--files-from", type=click.Path(path_type=Path),
              help="Take tokenizer, chat template and generation config from here (default: BASE).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]: where to merge.")
@click.option("--force", is_flag=True, help="Replace an existing output directory (once the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@one_line_errors
def merge(base, out_dir, dtype, shard_size, files_from, device, force, quiet, **flags):
    """Merge LoRA adapters and/or a residual into BASE and write a complete HF model directory.

    Computes W + scale * (B @ A) (DoRA, rsLoRA, rank/alpha patterns, modules_to_save and embedding
    LoRA as peft merges them) and W + s * delta in float32, rounds once, and streams the result
    into sharded safetensors with the base's config and tokenizer, plus merge.json.

    \b
    Examples:
      quantkit merge ./Qwen3-8B --lora ./my-adapter -o ./merged
      quantkit merge ./base --lora ./a1 --lora ./a2 --weight 1.0 --weight 0.5 -o ./merged
      quantkit merge ./Llama-3.1-8B --residual ./delta --scale 1.0 -o ./merged --files-from ./delta
    """
    from .merge import open_model, parse_size, write_merged
    from .merged import MergedModel

    loras, weights, residual = flags["input__lora"], flags["input__lora_weights"], flags["input__residual"]
    scale = 1.0 if flags["input__residual_scale"] is None else flags["input__residual_scale"]
    if not loras and residual is None:
        raise click.UsageError("nothing to merge: give --lora and/or --residual")
    shard_bytes = parse_size(shard_size)
    if files_from is not None and not any((Path(files_from) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise InputError("--files-from: no tokenizer.json or tokenizer.model here; give the model directory whose tokenizer, chat "
                         "template and generation config the merged model should carry", files_from)
    src = open_model(base, loras, weights, residual, scale, dtype=dtype, device=_resolve_device(device),
                     ignore_base_name=bool(flags["input__ignore_base_name"]))
    assert isinstance(src, MergedModel)
    note = write_merged(src, out_dir, files_from=files_from, shard_bytes=shard_bytes,
                        progress=not quiet, force=force)
    click.echo(f"merged {len(loras)} adapter(s){' and a residual' if residual else ''} into {out_dir} "
               f"({len(note['files']['shards'])} shard(s), {note['seconds']:.1f} s); details in {Path(out_dir) / 'merge.json'}")


@main.group()
def residual():
    """Full-rank weight differences (delta = instruct - base).

    \b
    Example:
      quantkit residual extract --instruct ./Qwen3-8B --base ./Qwen3-8B-Base -o ./delta
    """


@residual.command("extract")
@click.option("--instruct", type=click.Path(path_type=Path), required=True, help="The fine-tuned model.")
@click.option("--base", type=click.Path(path_type=Path), required=True, help="The model it was tuned from.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True,
              help="Dtype of the stored delta (residual model cards publish fp16).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest shard, e.g. 5GB, 500MB.")
@click.option("--force", is_flag=True, help="Replace an existing output directory (once the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@one_line_errors
def residual_extract(instruct, base, out_dir, dtype, shard_size, force, quiet):
    """Write delta = INSTRUCT - BASE (float32 difference, rounded once) as a checkpoint.

    \b
    Examples:
      quantkit residual extract --instruct ./Qwen3-8B --base ./Qwen3-8B-Base -o ./delta
      quantkit merge ./my-continued-base --residual ./delta -o ./merged --files-from ./delta
    """
    from .merge import extract_residual, parse_size

    note = extract_residual(instruct, base, out_dir, dtype=dtype, shard_bytes=parse_size(shard_size),
                            progress=not quiet, force=force)
    click.echo(f"residual written to {out_dir} ({len(note['files']['shards'])} shard(s), {note['seconds']:.1f} s)")


@main.command()
@click.option("--baseline", type=click.Path(path_type=Path), required=True,
              help="The unquantized (bf16) HF model directory every variant is compared with.")
@click.argument("variants", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Report directory.")
@click.option("--text", type=click.Path(path_type=Path), help="Evaluation text (default: the bundled WikiText-2 test split).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per window (llama-perplexity's -c).")
@click.option("--limit-chunks", type=click.IntRange(min=0), help="Score only the first N windows (quick runs; 0: all).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--gpus", help="Comma-separated GPUs to report on, e.g. rtx4090,a100-40 (default: the whole catalog).")
@click.option("--gpu", "extra_gpus", multiple=True, help="Add a GPU: 'NAME=GiB' (repeatable).")
@click.option("--gpu-catalog", type=click.Path(path_type=Path), help="JSON file of GPU name -> MiB, added to the catalog.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="0: KLD over the whole vocabulary, as llama-perplexity --kl-divergence (the baseline's "
                   "log-probabilities are cached on disk, 2 bytes per vocabulary entry per scored token: 25 MB "
                   "per window for SmolLM2, 65 MB for Llama 3). K: keep the baseline's top K tokens only "
                   "(compact; reads low).")
@click.option("--estimate-vram", is_flag=True, help="Estimate VRAM even on a GPU (no measuring subprocesses).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@one_line_errors
def bench(baseline, variants, out_dir, text, ctx, limit_chunks, device, gpus, extra_gpus, gpu_catalog, top_k,
          estimate_vram, quiet):
    """Perplexity, KL divergence and VRAM of each variant against the bf16 baseline, and the report.

    VARIANTS are GGUF files (scored with llama.cpp) and GPTQ / INT8 / NF4 / bf16 HF directories (scored
    with transformers), all on the same tokens, with llama-perplexity's protocol. The report lands in
    OUT: report.md, report.json, quality.png, vram.png.

    \b
    Examples:
      quantkit bench --baseline ./my-model out/*.gguf -o ./report
      quantkit bench --baseline ./my-model out/*.gguf --limit-chunks 20 --gpus rtx4090,a100-40 -o ./report
    """
    _quiet_libraries(quiet)
    from .bench import suite, vram

    if not variants:
        raise click.UsageError("give at least one variant (a .gguf file or a model directory)")
    check_out_dir(out_dir, baseline, *[v for v in variants if Path(v).is_dir()])
    suite.check_extras(gguf=any(Path(v).suffix == ".gguf" for v in variants))
    try:
        selected = vram.parse_gpus([g.strip() for g in gpus.split(",")] if gpus else None, list(extra_gpus),
                                   gpu_catalog)
    except (ValueError, OSError) as e:
        raise QuantkitError(str(e) if str(e).startswith(("--gpu", str(gpu_catalog))) else f"--gpus: {e}") from None
    dev = _resolve_device(device)
    res = suite.run(baseline, list(variants), out_dir, text=text, ctx=ctx, device=dev, limit_chunks=limit_chunks or None,
                    gpus=selected, top_k=top_k, measure_vram=False if estimate_vram else None, progress=not quiet)
    b = res["baseline"]
    click.echo(f"{b['label']:10} ppl {b['ppl']:.4f} ± {b['ppl_err']:.4f}  (baseline)")
    for v in res["variants"]:
        click.echo(f"{v['label']:10} ppl {v['ppl']:.4f} ± {v['ppl_err']:.4f}  Δ {100 * (v['ppl_ratio'] - 1):+.2f}%  "
                   f"KLD {v['kld_mean']:.5f}  top-1 {100 * v['same_top']:.1f}%")
    click.echo(f"report: {Path(out_dir) / 'report.md'}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path), default="pipeline.toml")
@click.option("--force", is_flag=True, help="Replace an existing file.")
@one_line_errors
def init(path, force):
    """Write a commented example pipeline.toml for `quantkit run`.

    \b
    Example:
      quantkit init && $EDITOR pipeline.toml && quantkit run pipeline.toml --dry-run
    """
    from .outputs import write_text_atomic
    from .pipeline_config import example
    if path.exists() and not force:
        raise click.UsageError(f"{path} exists (--force replaces it)")
    check_out_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, example())
    click.echo(f"wrote {path}: edit [input] base, then `quantkit run {path} --dry-run`")


@main.command()
@click.argument("pipelines", nargs=-1, type=click.Path(path_type=Path))
@flag_options()
@click.option("--dry-run", is_flag=True, help="Print the steps, what is already done, sizes and disk space; run nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars (one line per step stays).")
@click.option("--rehash", is_flag=True,
              help="Read every input and output again to check its hash, instead of trusting files whose size, "
                   "times and inode are unchanged since they were hashed.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run the steps as tasks on a Ray cluster: ADDRESS is its head (host:port, or auto); without "
                   "one, [cluster] address, else Ray starts on this machine. Outputs and inputs must be on storage "
                   "every node sees. Needs quantkit[ray].")
@one_line_errors
def run(pipelines, dry_run, quiet, rehash, ray_address, **flags):
    """Run a pipeline: merge, GGUF, GPTQ, INT8/NF4 and the report, skipping what is already done.

    The steps come from PIPELINE (a TOML file, see `quantkit init`), from flags, or both (a flag
    wins over the file). Every step's inputs, settings and outputs are recorded (content hashes) in
    OUT/pipeline.json; a rerun after a crash, a kill or Ctrl-C redoes only the steps whose record
    does not match. A file whose size, times and inode are unchanged since it was hashed is not
    read again (--rehash reads everything). Without a file the defaults are pipeline.toml's: all
    three GGUF types and the report; GPTQ, INT8 and NF4 when asked for.

    Several files are several pipelines (one per model or adapter), run one after the other, or side by
    side on a cluster with --ray: there every step is a Ray task (GGUF, merge, INT8/NF4 on CPUs; imatrix,
    GPTQ and scoring on a GPU when there is one) and each variant's VRAM and decode speed are measured on
    every GPU type of the cluster. See docs/cluster.md.

    \b
    Examples:
      quantkit init pipeline.toml && quantkit run pipeline.toml --dry-run && quantkit run pipeline.toml
      quantkit run a.toml b.toml --ray 10.0.0.5:6379
      quantkit run --base ./base --lora ./adapter --gguf q4_k_m,q5_k_m,q8_0 --gptq --int8 \\
          --bench --gpus rtx4090,a100-40 -o ./out
    """
    _quiet_libraries(quiet)
    from .pipeline_config import parse

    overrides = _overrides(flags)
    if not pipelines and not overrides:
        raise click.UsageError("give a pipeline file (quantkit init writes one) or --base and the outputs wanted")
    if ray_address and (ray_address.endswith(".toml") or Path(ray_address).is_file()):
        raise click.UsageError(f"--ray takes the cluster's address, not {ray_address!r}: put the pipeline files "
                               "before --ray")
    cfgs = [parse(p, overrides) for p in pipelines] or [parse(None, overrides)]
    labels = _labels(pipelines, cfgs)
    if ray_address is not None:
        from .cluster import ClusterFailed
        from .cluster import run as run_on_cluster
        try:
            for line in run_on_cluster(cfgs, labels, ray_address or None, dry_run=dry_run, rehash=rehash,
                                       echo=lambda m: click.echo(m, err=True)):
                click.echo(line)
        except ClusterFailed as e:
            for line in e.lines:
                click.echo(line)
            raise
        return
    for cfg, label in zip(cfgs, labels):
        if len(cfgs) > 1:
            click.echo(f"== {label}", err=True)
        _run_one(cfg, dry_run, quiet, rehash)


def _labels(pipelines: tuple[Path, ...], cfgs: list) -> list[str]:
    """What the progress lines call each pipeline: its file's name, else its output directory's."""
    names = [Path(p).stem for p in pipelines] or [Path(cfgs[0]["output"]["dir"]).name]
    if len(set(names)) < len(names):
        names = [Path(c["output"]["dir"]).name for c in cfgs]
    if len(set(names)) < len(names):
        names = [f"{i}-{n}" for i, n in enumerate(names, 1)]
    return names


def _run_one(cfg, dry_run: bool, quiet: bool, rehash: bool) -> None:
    from . import pipeline as pl
    from .manifest import Manifest, run_steps
    try:
        device = _resolve_device(cfg["output"]["device"], flag="", dry_run=dry_run)
    except QuantkitError as e:
        raise cfg.error("output", "device", str(e)) from None
    plan = pl.build(cfg, device, progress=not quiet)
    manifest = Manifest.load(plan.out, trust_stats=not rehash)
    if dry_run:
        for line in pl.describe(plan, manifest):
            click.echo(line)
        return
    pl.require_disk(plan, manifest)
    with pl.claim(plan.out):
        status = run_steps(plan.steps, manifest, echo=lambda m: click.echo(m, err=True))
    for line in pl.summary(plan, status, manifest):
        click.echo(line)


@main.command("default-model")
@click.option("--force", is_flag=True, help="Rebuild even if a complete copy exists.")
@one_line_errors
def default_model(force):
    """Build (once) and print the path of the bundled SmolLM2-135M-Instruct bf16 checkpoint.

    \b
    Example:
      quantkit export "$(quantkit default-model)" --gguf q4_k_m -o ./out
    """
    from .default_model import build_default_model
    click.echo(str(build_default_model(force=force)))


@main.command("families")
@one_line_errors
def families_cmd():
    """Print the supported model families, from the family registry (a Markdown table).

    \b
    Example:
      quantkit families
    """
    from .families import support_table
    click.echo(support_table())


def _write_stats(path: Path, seconds: float, device: str) -> None:
    """Timings and peaks of this process, for benchmarks (export.json holds none: it is reproducible)."""
    import json
    import resource

    import torch
    from .outputs import write_text_atomic
    stats = {"seconds": round(seconds, 3), "device": device,
             "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.device(device).type == "cuda":
        stats["gpu"] = torch.cuda.get_device_name(device)
        stats["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        stats["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    write_text_atomic(Path(path), json.dumps(stats, indent=2) + "\n")


def _resolve_device(device: str, flag: str = "--device", *, dry_run: bool = False) -> str:
    """auto -> cuda when torch sees a GPU, else cpu; cpu and cuda[:N] are checked against this machine
    (not for a dry run, which may plan a GPU job on a machine without one)."""
    import torch
    flag = f"{flag}: " if flag else ""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise QuantkitError(f"{flag}unknown device {device!r} (auto, cpu or cuda[:N])") from None
    if dev.type not in ("cpu", "cuda"):
        raise QuantkitError(f"{flag}unsupported device {device!r} (auto, cpu or cuda[:N])")
    if dev.type == "cpu":
        return "cpu"                    # cpu:0 is the CPU: the code compares against "cpu"
    if not dry_run:
        if not torch.cuda.is_available():
            raise QuantkitError(f"{flag}{device!r} asked for, but torch {torch.__version__} sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QuantkitError(f"{flag}{device!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    return device


if __name__ == "__main__":
    main()
