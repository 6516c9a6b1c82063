"""The on-disk cubin cache of kernels/nvrtc.py (NVRTC itself needs a CUDA machine: the CUDA tests
in test_kernels_registry.py compile and run searches.cu there)."""
from __future__ import annotations

from quantkit.kernels import nvrtc


def test_cubins_are_compiled_once_and_kept_by_source_arch_options_and_nvrtc_version(tmp_path, monkeypatch):
    calls = []

    def compile_cubin(source, arch, options, name="quantkit.cu"):
        calls.append((source, arch, tuple(options)))
        return f"cubin of {source} for {arch} with {options}".encode()

    monkeypatch.setattr(nvrtc, "compile_cubin", compile_cubin)
    monkeypatch.setattr(nvrtc, "_nvrtc_version", lambda: (13, 5))
    monkeypatch.setenv("QUANTKIT_CACHE_DIR", str(tmp_path / "cache"))
    first = nvrtc.cached_cubin("src", "90", ["--fmad=false"], "s.cu")
    assert first == b"cubin of src for 90 with ['--fmad=false']"
    assert nvrtc.cached_cubin("src", "90", ["--fmad=false"], "s.cu") == first
    assert len(calls) == 1                                  # the second came from the disk
    nvrtc.cached_cubin("src 2", "90", ["--fmad=false"], "s.cu")
    nvrtc.cached_cubin("src", "80", ["--fmad=false"], "s.cu")
    nvrtc.cached_cubin("src", "90", ["--fmad=true"], "s.cu")
    monkeypatch.setattr(nvrtc, "_nvrtc_version", lambda: (13, 6))
    nvrtc.cached_cubin("src", "90", ["--fmad=false"], "s.cu")
    assert len(calls) == 5                                  # each change compiles anew
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 5 and all(f.startswith("s.cu-sm_") and f.endswith(".cubin") for f in files)


def test_a_cache_folder_that_cannot_be_written_only_means_compiling(tmp_path, monkeypatch):
    monkeypatch.setattr(nvrtc, "compile_cubin", lambda source, arch, options, name="quantkit.cu": b"cubin")
    monkeypatch.setattr(nvrtc, "_nvrtc_version", lambda: (13, 5))
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("QUANTKIT_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    assert nvrtc.cached_cubin("src", "90", [], "s.cu") == b"cubin"
