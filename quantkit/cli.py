"""The `quantkit` command line: Click commands only; the work is in the library."""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import QuantkitError


def one_line_errors(fn):
    """Turn QuantkitError (and a disk full) into one line on stderr and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
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
        except KeyboardInterrupt:
            click.echo("quantkit: interrupted; no partial output was kept", err=True)
            sys.exit(130)
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


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--gguf", "gguf_types", default="q4_k_m,q5_k_m,q8_0", show_default=True,
              help="Comma-separated GGUF types: q8_0, q5_k_m, q4_k_m, bf16, f16.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), help="Output directory (required unless --dry-run).")
@click.option("--name", default=None, help="Model name for metadata and file names (default: from the model card/dir).")
@click.option("--ollama", is_flag=True, help="Also write an Ollama Modelfile next to each GGUF.")
@click.option("--dry-run", is_flag=True, help="Print the per-tensor type plan and exit without reading weights.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]: where to quantize.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@one_line_errors
def export(model, gguf_types, out_dir, name, ollama, dry_run, device, quiet):
    """Export a HF model directory to GGUF files, all types in one pass.

    Reads each tensor of MODEL (config.json + safetensors + tokenizer.json) once and writes one
    GGUF per requested type, byte-identical to convert_hf_to_gguf.py + llama-quantize.

    \b
    Examples:
      quantkit export ./my-model --gguf q4_k_m,q5_k_m,q8_0 -o ./out
      quantkit export ./my-model --gguf q4_k_m --dry-run        # show the type of every tensor
      quantkit export ./my-model --gguf q8_0 --ollama -o ./out  # plus out/Modelfile.Q8_0
    """
    from .export import export_gguf
    from .plan import parse_variants

    variants = parse_variants(gguf_types)
    if out_dir is None and not dry_run:
        raise click.UsageError("missing option '-o' / '--out' (the output directory)")
    dev = _resolve_device(device)
    res = export_gguf(model, variants, out_dir, name=name, device=dev, progress=not quiet, dry_run=dry_run)
    if dry_run:
        return
    if ollama:
        from .ollama import write_modelfiles
        write_modelfiles(Path(model), res.files)
    for v, path in res.files.items():
        size = path.stat().st_size
        click.echo(f"{v.upper():8} {size / 2**20:10.1f} MiB  {path}")
    click.echo(f"done in {res.seconds:.1f} s; details in {Path(out_dir) / 'export.json'}")


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


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
