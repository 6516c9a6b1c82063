"""quantkit: merge, quantize and benchmark fine-tuned LLMs."""

__version__ = "0.1.0"


def _unshadow_kernels() -> None:
    # Run from a source checkout (python -m / -c in the repository root), the root is on sys.path and
    # our folder kernels/ becomes importable as the top-level package `kernels`, which transformers
    # and bitsandbytes import as an unrelated PyPI package. quantkit is importable without that entry
    # (installed, or editable through its finder), so drop it before anything else imports `kernels`.
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if (root / "kernels" / "registry.py").is_file() and "kernels" not in sys.modules:
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]


_unshadow_kernels()
