"""`quantkit run --ray` (issue 25) on a real local Ray cluster: a head and two nodes whose custom
resources stand in for two GPU types (accelerator_type:A100, accelerator_type:RTX4090); no mocks.

Ray binds to the machine's network address when it has one: the tests marked `ray` run only in a
network namespace that has nothing but loopback (`make test` runs them under `unshare --net`), and
refuse to run elsewhere (skipped; failed when QUANTKIT_RAY_TESTS=1 says they must run).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli import main

TYPES = ["q8_0", "q4_k_m", "q5_k_m"]
GPU_TYPES = ("A100", "RTX4090")


def isolated() -> bool:
    """Only loopback: Ray's nodes then bind 127.0.0.1 and nothing leaves the machine."""
    import socket
    return {name for _, name in socket.if_nameindex()} == {"lo"}


def _require_isolation():
    if not isolated():
        msg = ("the Ray tests run in a network namespace that has only loopback: "
               "unshare --net sh -c 'ip link set lo up && pytest -m ray' (make test does)")
        if os.environ.get("QUANTKIT_RAY_TESTS"):
            pytest.fail(msg)
        pytest.skip(msg)
    pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    _require_isolation()
    import ray
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for t in GPU_TYPES:
        c.add_node(num_cpus=1, resources={f"accelerator_type:{t}": 1})
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    ray.shutdown()
    yield c.address, nodes
    c.shutdown()


@pytest.fixture(scope="module")
def two_models(tiny_model, tmp_path_factory):
    """The 64-wide tiny Llama, and a second of the same shape with other random weights."""
    from quantkit.testing import synthetic
    cfg = json.loads((tiny_model / "config.json").read_text())
    b = synthetic.write_checkpoint(tmp_path_factory.mktemp("cluster") / "tiny-b", cfg, seed=1)
    for f in tiny_model.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "config.json" and f.is_file():
            shutil.copyfile(f, b / f.name)
    return {"a": tiny_model, "b": b}


def pipelines(models: dict, where: Path, *, bench: bool = True, cluster: str = "") -> list[Path]:
    files = []
    for name, base in models.items():
        p = where / f"{name}.toml"
        p.write_text(f'[input]\nbase = "{base}"\n[output]\ndir = "out-{name}"\ndevice = "cpu"\n'
                     f'[gguf]\ntypes = {json.dumps(TYPES)}\n[bench]\nenabled = {str(bench).lower()}\n'
                     f'limit_chunks = 1\nctx = 128\n[cluster]\ncpus_per_step = 1\n{cluster}')
        files.append(p)
    return files


def quantkit(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantkit", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=900, **kw)


def ggufs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "gguf").glob("*.gguf"))}


@pytest.fixture(scope="module")
def sequential(two_models, tmp_path_factory):
    """The same pipelines run by `quantkit run` one after the other, without Ray."""
    where = tmp_path_factory.mktemp("sequential")
    files = pipelines(two_models, where)
    r = CliRunner().invoke(main, ["run", *map(str, files), "-q"])
    assert r.exit_code == 0, r.output
    return where


@pytest.mark.ray
def test_sweep_matches_sequential_run_and_measures_on_each_gpu_type(cluster, two_models, sequential, tmp_path):
    address, nodes = cluster
    files = pipelines(two_models, tmp_path)
    r = quantkit("run", *files, "--ray", address, "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in two_models:
        seq, par = ggufs(sequential / f"out-{name}"), ggufs(tmp_path / f"out-{name}")
        assert len(par) == len(TYPES) and par == seq, name
        report = json.loads((tmp_path / f"out-{name}" / "report" / "report.json").read_text())
        ref = json.loads((sequential / f"out-{name}" / "report" / "report.json").read_text())
        assert len(report["variants"]) == len(ref["variants"]) == len(TYPES)
        for got, want in zip(report["variants"], ref["variants"]):
            assert got["name"] == want["name"]
            assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-4)
            assert got["kld_mean"] == pytest.approx(want["kld_mean"], rel=1e-3, abs=1e-6)
        # every row (baseline + 3 variants) measured once per GPU type, on a node that has that type
        ms = report["measurements"]
        assert sorted((m["row"], m["gpu_type"]) for m in ms) == sorted(
            (row, t) for row in [two_models[name].name, *ggufs(sequential / f"out-{name}")] for t in GPU_TYPES)
        for m in ms:
            assert nodes[m["node"]].get(f"accelerator_type:{m['gpu_type']}") == 1, m
            assert m["decode"]["tokens_per_s"] > 0 and m["device"] == "cpu"   # these nodes have no CUDA
        per_gpu = report["decode"]["per_gpu"]
        assert set(GPU_TYPES) <= set(per_gpu)
        assert per_gpu["H100 80GB"][ms[0]["row"]]["source"] == "estimated"
        assert "## Decode speed" in (tmp_path / f"out-{name}" / "report" / "report.md").read_text()
        steps = json.loads((tmp_path / f"out-{name}" / "pipeline.json").read_text())["steps"]
        assert set(steps) == {"gguf", "bench"}
    # one line per task state change, and a summary with the node of each task
    assert re.search(r"^\[a:gguf\] running on \S+ node [0-9a-f]{8} \(pid \d+\)$", r.stderr, re.M), r.stderr
    assert re.search(r"^b:bench\s+done\s+[\d.]+ s\s+[\d.]+ s\s+1\s+\S+ [0-9a-f]{8}$", r.stdout, re.M), r.stdout
    # a rerun finds everything done
    again = quantkit("run", *files, "--ray", address, "-q")
    assert again.returncode == 0 and again.stderr.count("done before, skipped") == 4, again.stderr


@pytest.mark.ray
def test_a_worker_killed_mid_export_reruns_that_step_only(cluster, two_models, sequential, tmp_path):
    address, _ = cluster
    files = pipelines(two_models, tmp_path, bench=False)
    proc = subprocess.Popen([sys.executable, "-m", "quantkit", "run", *map(str, files), "--ray", address, "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    log, killed = [], None
    for line in proc.stderr:
        log.append(line)
        m = re.match(r"\[a:gguf\] running on \S+ node \S+ \(pid (\d+)\)", line)
        if m and killed is None:
            pid = int(m.group(1))
            deadline = time.time() + 60
            while not (staged := list((tmp_path / "out-a").glob(f".gguf.partial-{pid}-*/*"))) and time.time() < deadline:
                time.sleep(0.005)
            assert staged, "the export ended before its staged files could be seen"
            os.kill(pid, signal.SIGKILL)          # mid-export: its staged files exist, not yet renamed
            killed = pid
    out, _ = proc.communicate(timeout=600)
    text = "".join(log)
    assert proc.returncode == 0 and killed, text
    assert re.search(r"^\[a:gguf\] running on .*attempt 2: its worker was lost\)$", text, re.M), text
    assert "[b:gguf] running" in text and "attempt 2" not in "".join(x for x in log if x.startswith("[b:"))
    assert re.search(r"^a:gguf\s+done\s+[\d.]+ s\s+[\d.]+ s\s+2\s", out, re.M) and re.search(r"^b:gguf\s+done\s+[\d.]+ s\s+[\d.]+ s\s+1\s",
                                                                                  out, re.M), out
    for name in two_models:
        assert ggufs(tmp_path / f"out-{name}") == ggufs(sequential / f"out-{name}")
        assert not [p for p in (tmp_path / f"out-{name}").iterdir() if ".partial" in p.name]


@pytest.mark.ray
def test_a_step_that_fails_stops_its_pipeline_only(cluster, two_models, tmp_path):
    """A NaN in b's weights passes the checks (they read no weights) and stops b's export when read:
    b's bench is not run, a's pipeline completes, and the run exits non-zero naming the step."""
    import torch
    from safetensors.torch import load_file, save_file
    address, _ = cluster
    bad = tmp_path / "nan-model"
    shutil.copytree(two_models["b"], bad)
    w = load_file(bad / "model.safetensors")
    name = next(n for n in w if "mlp.down_proj" in n)
    w[name][0, 0] = torch.nan
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    files = pipelines({"a": two_models["a"], "b": bad}, tmp_path)
    r = quantkit("run", *files, "--ray", address, "-q")
    assert r.returncode == 2, r.stderr
    assert re.search(r"^\[b:gguf\] failed: .*contains NaN or Inf", r.stderr, re.M), r.stderr
    assert "[b:bench] not run: a step it reads failed" in r.stderr
    assert "2 step(s) did not complete: b:gguf: " in r.stderr.strip().splitlines()[-1]
    assert re.search(r"^a:bench\s+done", r.stdout, re.M) and re.search(r"^b:bench\s+blocked", r.stdout, re.M), r.stdout
    assert len(ggufs(tmp_path / "out-a")) == len(TYPES) and not (tmp_path / "out-b" / "gguf").exists()
    manifest = tmp_path / "out-b" / "pipeline.json"
    assert not manifest.exists() or not json.loads(manifest.read_text())["steps"]


@pytest.mark.ray
def test_a_gpu_type_nobody_has_stops_before_any_work(cluster, two_models, tmp_path):
    address, _ = cluster
    files = pipelines(two_models, tmp_path, cluster='measure_on = ["H100"]\n')
    r = quantkit("run", *files, "--ray", address)
    assert r.returncode == 2 and "no node of the cluster has GPU type 'H100' (it has: A100, RTX4090)" in r.stderr, \
        r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) < 300 and not (tmp_path / "out-a").exists()
    # the plan, where each task goes, and nothing written
    files = pipelines(two_models, tmp_path)
    r = quantkit("run", *files, "--ray", address, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "GPU types: A100 (no GPU resource), RTX4090 (no GPU resource)" in r.stderr and r.stdout.count("[1/2] gguf   will run (not run yet)") == 2
    assert "bench: a task of 1 CPU; then per row, a measuring task on each GPU type (A100, RTX4090)" in r.stdout
    assert not (tmp_path / "out-a").exists()


@pytest.mark.ray
def test_an_unreachable_address_is_one_line(two_models, tmp_path):
    _require_isolation()
    files = pipelines(two_models, tmp_path)
    r = quantkit("run", *files, "--ray", "127.0.0.1:9")
    assert r.returncode == 2, r.stderr
    assert "the Ray cluster cannot be reached (Connection refused)" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out-a").exists()


@pytest.mark.ray
def test_an_output_a_node_cannot_see_is_refused(two_models, tmp_path):
    """A node started in a mount namespace of its own, with an empty tmpfs over the directory that
    holds the outputs: it cannot see them, as a node without the shared volume would not."""
    _require_isolation()
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root (a mount namespace for the node)")
    import ray
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    hidden = tmp_path / "shared"
    hidden.mkdir()
    node = subprocess.Popen(["unshare", "--mount", "sh", "-c", f"mount -t tmpfs tmpfs '{hidden}' && exec "
                             f"'{sys.executable}' -m ray.scripts.scripts start --address={c.address} --num-cpus=1 "
                             "--block"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
        deadline = time.time() + 120
        while sum(n["Alive"] for n in ray.nodes()) < 2 and time.time() < deadline:
            time.sleep(0.5)
        ray.shutdown()
        files = pipelines(two_models, hidden, bench=False)
        r = quantkit("run", *files, "--ray", c.address)
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert f"{hidden}/out-" in last and "not visible from the Ray node" in last, r.stderr
        assert not list((hidden / "out-a").glob("gguf*")) and not (hidden / "out-a" / "pipeline.json").exists()
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
        c.shutdown()


def test_without_ray_installed_the_flag_is_one_line(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)          # import ray → ModuleNotFoundError
    files = pipelines({"a": tiny_model}, tmp_path)
    r = CliRunner().invoke(main, ["run", str(files[0]), "--ray"])
    assert r.exit_code == 2 and "pip install 'quantkit[ray]'" in r.output, r.output
    assert not (tmp_path / "out-a").exists()


def test_ray_takes_an_address_not_a_pipeline(tiny_model, tmp_path):
    files = pipelines({"a": tiny_model, "b": tiny_model}, tmp_path)
    r = CliRunner().invoke(main, ["run", str(files[0]), "--ray", str(files[1])])
    assert r.exit_code == 2 and "put the pipeline files before --ray" in r.output, r.output
