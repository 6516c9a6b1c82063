"""Packaging: `quantkit` is the only top-level package, and every command documents an example."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_the_quantkit_package(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {r.stderr[-500:]}")
    (whl,) = tmp_path.glob("quantkit-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"quantkit"}
    # our kernels/, converters/ and bench/ folders live under quantkit/, with the bundled text and
    # the GPU searches' CUDA source (compiled at run time)
    for f in ("quantkit/kernels/registry.py", "quantkit/converters/gguf_file.py", "quantkit/bench/export_speed.py",
              "quantkit/data/wiki.test.raw", "quantkit/kernels/searches.cu", "quantkit/families/llama.py",
              "quantkit/testing/synthetic.py"):
        assert f in names, f
    top_level = [n for n in names if n.endswith("top_level.txt")]
    if top_level:
        assert zipfile.ZipFile(whl).read(top_level[0]).decode().split() == ["quantkit"]


def test_no_top_level_kernels_package_is_ours(tmp_path):
    # transformers imports the PyPI package `kernels` when it is importable: ours must never be it
    code = ("import importlib.util, sys; s = importlib.util.find_spec('kernels'); "
            "print(s.origin if s else 'none')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert str(REPO / "kernels") not in r.stdout, r.stdout      # the PyPI one may be installed (in .venv)
    assert "quantkit.kernels" in sys.modules or __import__("quantkit.kernels")


@pytest.mark.parametrize("command", [[], ["export"], ["default-model"]])
def test_every_command_has_help_with_an_example(command):
    r = CliRunner().invoke(main, [*command, "--help"])
    assert r.exit_code == 0
    assert "Example" in r.output and "quantkit " in r.output


def test_run_from_the_checkout_our_kernels_folder_never_passes_for_the_pypi_package():
    # python -c / -m put the working directory on sys.path: from the repository root, kernels/ is
    # importable as the top-level `kernels` that transformers and bitsandbytes probe. transformers must
    # still see no such package, and importing quantkit must leave sys.path alone.
    code = ("import sys; before = list(sys.path); import quantkit, quantkit.kernels; assert sys.path == before; "
            "from transformers.utils.import_utils import is_kernels_available; print(is_kernels_available()); "
            "import kernels; print(sorted(k for k in vars(kernels) if not k.startswith('__')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["False", "[]"], r.stdout
