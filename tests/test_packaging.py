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


def test_export_help_lists_every_gguf_type_the_plan_knows():
    import re

    from quantkit.plan import VARIANTS
    r = CliRunner().invoke(main, ["export", "--help"])
    listed = re.search(r"Types:\s*([a-z0-9_,\s]+)\.", r.output).group(1)
    assert [t.strip() for t in listed.split(",")] == list(VARIANTS)


def test_run_from_the_checkout_our_kernels_folder_never_passes_for_the_pypi_package():
    # python -c / -m put the working directory on sys.path: from the repository root, kernels/ is found
    # as the top-level `kernels`, a PyPI package transformers depends on and imports. Importing it there
    # must give that package (or, where it is not installed, nothing of ours), and importing quantkit
    # must leave sys.path alone.
    code = ("import sys; before = list(sys.path); import quantkit, quantkit.kernels; assert sys.path == before; "
            "import kernels; print(kernels.__file__); print(hasattr(kernels, 'get_kernel'), "
            "hasattr(kernels, 'quantize_rows'))")
    elsewhere = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO.parent)
    here = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert here.returncode == 0, here.stderr
    if elsewhere.returncode == 0:                   # the PyPI package is installed: the same one from here
        assert here.stdout == elsewhere.stdout and str(REPO / "kernels") not in here.stdout, (here.stdout,
                                                                                              elsewhere.stdout)
    else:
        assert here.stdout.splitlines()[1] == "False False", here.stdout
