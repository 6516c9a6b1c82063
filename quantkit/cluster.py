"""`quantkit run --ray`: the steps of one or several pipelines as Ray tasks on a cluster.

Nothing is scheduled here: Ray places each task on a node that has what it asks for.

    merge, gguf, int8, nf4       CPU tasks ([cluster] cpus_per_step CPUs)
    imatrix, gptq                a GPU when the cluster has one ([cluster] gpu_steps), else CPU
    bench                        one scoring task (PPL / KLD against the baseline), and one measuring
                                 task per row (the baseline and each variant) per GPU type of the
                                 cluster (Ray's accelerator_type:<TYPE> resources), which measures
                                 VRAM and decode speed there; the report is put together here

The manifest (OUT/pipeline.json) stays the one record: this process (the driver) alone reads and
writes it. A step starts when the steps whose outputs it reads are done; it is skipped when its
record still holds, as in a sequential run. The task runs the same Step as `quantkit run` does
(the plan is rebuilt on the worker from the same settings), so it writes the same bytes, staged under
a hidden name and renamed when complete. A worker or node lost mid-step: Ray runs that task again
([cluster] retries times); nothing else reruns. OUT and the inputs must be on storage every node
sees (checked before any work: each node reads a file written here).
"""
from __future__ import annotations

import functools
import os
import re
import socket
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import InputError, QuantkitError, UnsupportedError
from .manifest import Manifest, Step
from .pipeline_config import Pipeline

ACCELERATOR = "accelerator_type:"
# the environment the workers get from this process (a cluster's raylets have their own)
PASSED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "QUANTKIT_CACHE", "QUANTKIT_DEBUG", "QUANTKIT_LLAMACPP_SRC")


def import_ray():
    try:
        import ray
    except ModuleNotFoundError:
        raise UnsupportedError("--ray needs Ray, which is not installed: pip install 'quantkit[ray]'") from None
    return ray


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """A host:port (or ray://host:port) that does not answer → one line, before Ray's own minute of retries."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]\s]+?)\]?:(\d+)", address)
    if not m:
        raise InputError(f"--ray {address!r}: expected the Ray head's host:port (e.g. 10.0.0.5:6379), 'auto', or "
                         "nothing (start Ray on this machine)")
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout).close()
    except OSError as e:
        raise InputError(f"--ray {address}: the Ray cluster cannot be reached ({e.strerror or e}); is `ray start "
                         f"--head` running there, and is the port open?") from None


@dataclass
class Model:
    """One pipeline: its settings, plan (built here, for the checks and the manifest) and manifest."""
    label: str
    cfg: Pipeline
    plan: Any
    manifest: Manifest


@dataclass
class Task:
    model: Model
    step: Step
    deps: list[Task]
    state: str = "waiting"           # waiting, queued, running, done, skipped, failed, blocked
    attempts: int = 0
    started: float = 0.0
    seconds: float = 0.0             # queued to recorded, as this process saw it
    inside: float = 0.0              # the step itself, as its worker timed it
    node: str = ""
    host: str = ""
    refs: list = field(default_factory=list)
    error: str = ""

    @property
    def key(self) -> str:
        return f"{self.model.label}:{self.step.name}"


def depends(step: Step, earlier: Step) -> bool:
    """Whether `step` reads what `earlier` writes (an output, or a file below one)."""
    outs = [Path(o) for o in earlier.outputs]
    return any(Path(i) == o or o in Path(i).parents for i in step.inputs for o in outs)


def worker_device(configured: str, gpu_ids: list) -> str:
    """Where a task works: the GPU Ray gave it ("cuda": Ray makes it the only one the task sees),
    else the CPU, whatever other GPUs its node has (Ray leaves them visible to every task). [output]
    device = "cpu" keeps every step on the CPU."""
    return "cuda" if gpu_ids and configured != "cpu" else "cpu"


@functools.cache
def _remote():
    """The remote functions and the events actor (defined once Ray is imported: it is an extra)."""
    ray = import_ray()

    @ray.remote(num_cpus=0, max_restarts=-1)
    class Events:
        """Where tasks say they started (the driver prints it): Ray tells only when a task ends."""
        def __init__(self):
            self.queue = []

        def put(self, *event):
            self.queue.append(event)

        def drain(self):
            out, self.queue = self.queue, []
            return out

    def here(events, key: str) -> dict:
        ctx = ray.get_runtime_context()
        info = {"node": ctx.get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}
        try:
            ray.get(events.put.remote("started", key, info))
        except Exception:  # noqa: BLE001 - the progress line is lost, not the step
            pass
        return info

    def worker_plan(cfg: Pipeline):
        from . import pipeline as pl
        device = worker_device(cfg["output"]["device"], ray.get_gpu_ids())
        return pl.build(cfg, device, progress=False, checks=False), device

    @ray.remote(max_calls=1)
    def run_step(cfg: Pipeline, name: str, key: str, events) -> dict:
        info = here(events, key)
        plan, device = worker_plan(cfg)
        step = next(s for s in plan.steps if s.name == name)
        t0 = time.perf_counter()
        step.run()
        return {**info, "device": device, "seconds": time.perf_counter() - t0}

    @ray.remote(max_calls=1)
    def bench_score(cfg: Pipeline, key: str, events) -> dict:
        info = here(events, key)
        plan, device = worker_plan(cfg)
        t0 = time.perf_counter()
        results = next(s for s in plan.steps if s.name == "bench").job.score()
        return {**info, "device": device, "seconds": time.perf_counter() - t0, "results": results}

    @ray.remote      # a worker measures one row after another (VRAM in a fresh process; decode frees its model)
    def bench_measure(row: dict, gpu_type: str, key: str, events) -> dict:
        info = here(events, key)
        from .bench import suite
        t0 = time.perf_counter()
        m = suite.measure_here(row, "cuda", gpu_type)
        m["node"] = info["node"]
        return {**info, "device": m["device"], "seconds": time.perf_counter() - t0, "measurement": m}

    @ray.remote(num_cpus=0)
    def sees(paths: list[str], tokens: dict[str, str]) -> dict:
        """What this node cannot see of `paths`, and of the token files (path -> content)."""
        bad = [p for p in paths if not os.path.exists(p)]
        for p, text in tokens.items():
            try:
                ok = Path(p).read_text() == text
            except OSError:
                ok = False
            if not ok:
                bad.append(str(Path(p).parent))
        return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "missing": bad}

    return ray, Events, run_step, bench_score, bench_measure, sees


@dataclass
class Inventory:
    nodes: list[dict]
    gpu_types: dict[str, bool]       # accelerator type -> whether its nodes have GPU resources
    max_cpus: int
    has_gpu: bool

    @classmethod
    def of(cls, ray) -> Inventory:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        types: dict[str, bool] = {}
        for n in nodes:
            for k in n["Resources"]:
                if k.startswith(ACCELERATOR):
                    t = k[len(ACCELERATOR):]
                    types[t] = types.get(t, False) or n["Resources"].get("GPU", 0) > 0
        return cls(nodes, dict(sorted(types.items())), int(max(n["Resources"].get("CPU", 0) for n in nodes)),
                   any(n["Resources"].get("GPU", 0) > 0 for n in nodes))

    def describe(self) -> str:
        gpus = ", ".join(f"{t}{'' if real else ' (no GPU resource)'}" for t, real in self.gpu_types.items()) or "none"
        return f"Ray cluster: {len(self.nodes)} node(s), the largest with {self.max_cpus} CPU(s); GPU types: {gpus}"


def resources(step: str, settings: dict, inv: Inventory, device: str = "auto") -> dict:
    """What a step's task asks Ray for: CPUs (at most what the largest node that can run it has), and
    a GPU for [cluster] gpu_steps when the cluster has one (not with [output] device = "cpu")."""
    gpu = inv.has_gpu and step in settings["gpu_steps"] and device != "cpu"
    fit = [n["Resources"].get("CPU", 0) for n in inv.nodes if not gpu or n["Resources"].get("GPU", 0) >= 1]
    return {"num_cpus": max(1, min(settings["cpus_per_step"], int(max(fit, default=1)))), "num_gpus": 1 if gpu else 0}


def placement(steps: list[Step], settings: dict, inv: Inventory, device: str) -> list[str]:
    """The --dry-run lines saying what each step's tasks ask for."""
    types = settings["measure_on"] or list(inv.gpu_types)
    out = []
    for s in steps:
        r = resources(s.name, settings, inv, device)
        need = f"{r['num_cpus']} CPU" + (" + 1 GPU" if r["num_gpus"] else "")
        extra = f"; then per row, a measuring task on each GPU type ({', '.join(types)})" \
            if s.name == "bench" and types else ""
        out.append(f"  {s.name}: a task of {need}{extra}")
    return out


def measured_types(settings: dict, inv: Inventory) -> list[str]:
    return settings["measure_on"] or list(inv.gpu_types)


def mark_bench(models: list[Model], types: list[str]) -> None:
    """The bench step's record says which GPU types measured: a rerun with other types redoes it."""
    for m in models:
        for step in m.plan.steps:
            if step.name == "bench":
                step.settings = {**step.settings, "measured_on": sorted(types)}


class Sweep:
    """Every model's steps as tasks, run as their inputs become ready; progress one line per change."""

    def __init__(self, models: list[Model], inv: Inventory, settings: dict, echo: Callable[[str], None]):
        self.models, self.inv, self.s, self.echo = models, inv, settings, echo
        self.ray, Events, self.run_step, self.bench_score, self.bench_measure, _ = _remote()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        here = self.ray.get_runtime_context().get_node_id()
        self.events = Events.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote()
        self.tasks: list[Task] = []
        self.measure_on = measured_types(settings, inv)
        for m in models:
            for step in m.plan.steps:
                deps = [t for t in self.tasks if t.model is m and depends(step, t.step)]
                self.tasks.append(Task(m, step, deps))
        self.parts: dict[Any, tuple[Task, str]] = {}       # ref -> (task, what: step / score / measure row@type)
        self.bench_results: dict[str, dict] = {}
        self.measurements: dict[str, list[dict]] = {}

    def say(self, t: Task, text: str) -> None:
        self.echo(f"[{t.key}] {text}")

    def _options(self, t: Task) -> dict:
        return {**resources(t.step.name, self.s, self.inv, t.model.cfg["output"]["device"]),
                "max_retries": self.s["retries"],
                "retry_exceptions": False, "name": t.key}

    def start(self, t: Task) -> None:
        m = t.model
        why = m.manifest.why_not_done(t.step)
        if why is None:
            t.state = "skipped"
            self.say(t, "done before, skipped")
            return
        if m.manifest.steps.pop(t.step.name, None) is not None:      # the old record no longer vouches
            m.manifest.save()
        t.state, t.started = "queued", time.perf_counter()
        opts = self._options(t)
        need = f"{opts['num_cpus']} CPU" + (", 1 GPU" if opts["num_gpus"] else "")
        if t.step.name == "bench" and t.step.job is not None:
            self._start_bench(t, opts)
            self.say(t, f"queued ({why}): scoring ({need}) and {len(t.refs) - 1} measuring task(s) on "
                        f"{', '.join(self.measure_on) or 'no GPU type'}")
        else:
            ref = self.run_step.options(**opts).remote(m.cfg, t.step.name, t.key, self.events)
            t.refs = [ref]
            self.parts[ref] = (t, "step")
            self.say(t, f"queued ({why}; needs {need})")

    def _start_bench(self, t: Task, opts: dict) -> None:
        from .bench.backends import variant_kind
        job = t.step.job
        rows = [{"name": Path(p).name, "path": str(p), "kind": variant_kind(Path(p))}
                for p in [job.model_dir] + job.variants()]
        ref = self.bench_score.options(**opts).remote(t.model.cfg, t.key, self.events)
        t.refs, self.parts[ref] = [ref], (t, "score")
        self.measurements[t.key] = []
        for gpu_type in self.measure_on:
            real = self.inv.gpu_types.get(gpu_type, False)
            # a real GPU: one measurement per GPU, each in a fresh worker (a reused one would keep its
            # first GPU's CUDA context); a node without one (a stand-in type): one at a time per node
            on = {"num_gpus": 1, "max_calls": 1, "resources": {ACCELERATOR + gpu_type: 0.001}} if real else \
                {"num_gpus": 0, "resources": {ACCELERATOR + gpu_type: 1}}
            for row in rows:
                r = self.bench_measure.options(num_cpus=1, max_retries=self.s["retries"],
                                               name=f"{t.key}:{row['name']}@{gpu_type}", **on).remote(
                    row, gpu_type, f"{t.key}:{row['name']}@{gpu_type}", self.events)
                t.refs.append(r)
                self.parts[r] = (t, f"measure {row['name']} on {gpu_type}")

    def _ready(self, t: Task) -> bool:
        return t.state == "waiting" and all(d.state in ("done", "skipped") for d in t.deps)

    def _drain_events(self) -> None:
        try:
            events = self.ray.get(self.events.drain.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the actor restarts; only progress lines are lost
            return
        for kind, key, info in events:
            t = next((t for t in self.tasks if key == t.key or key.startswith(t.key + ":")), None)
            if t is None:
                continue
            part = key[len(t.key) + 1:]
            if part:
                self.say(t, f"measuring {part}: running on {info['host']} node {info['node'][:8]} (pid {info['pid']})")
                continue
            t.attempts += 1
            t.state = "running"
            again = f", attempt {t.attempts}: its worker was lost" if t.attempts > 1 else ""
            self.say(t, f"running on {info['host']} node {info['node'][:8]} (pid {info['pid']}{again})")

    def _finished(self, ref) -> None:
        t, what = self.parts.pop(ref)
        if t.state == "failed":
            return
        try:
            out = self.ray.get(ref)
        except Exception as e:  # noqa: BLE001 - a task's error (ours, or the worker's loss) fails that step only
            if what.startswith("measure"):          # a row that does not load on that GPU: its cell says so
                row, gpu_type = what.removeprefix("measure ").rsplit(" on ", 1)
                self.measurements[t.key].append({"row": row, "gpu_type": gpu_type, "device": None,
                                                 "error": _reason(e), "vram": None, "decode": None})
                self.say(t, f"{what}: failed: {_reason(e)}")
                return self._complete(t)
            t.state, t.error = "failed", _reason(e)
            for r in t.refs:
                if r in self.parts:
                    self.parts.pop(r)
                    self.ray.cancel(r, force=True)
            self.say(t, f"failed{'' if what == 'step' else ' (' + what + ')'}: {t.error}")
            return
        if what == "step" or what == "score":
            t.node, t.host, t.inside = out["node"], out["host"], out["seconds"]
        if what == "score":
            self.bench_results[t.key] = out["results"]
        elif what.startswith("measure"):
            self.measurements[t.key].append(out["measurement"])
            self.say(t, f"{what}: done in {out['seconds']:.1f} s on {out['host']} node {out['node'][:8]}")
        self._complete(t)

    def _complete(self, t: Task) -> None:
        """Once every part of a task is in: the report (bench), the check of the outputs, the record."""
        if any(r in self.parts for r in t.refs):
            return
        try:
            if t.step.name == "bench" and t.step.job is not None:
                t.step.job.finish(self.bench_results.pop(t.key), self.measurements.pop(t.key))
            missing = [str(p) for p in t.step.outputs if not Path(p).exists()]
            if missing:
                raise QuantkitError(f"did not write {', '.join(missing)}")
            t.seconds = time.perf_counter() - t.started
            t.model.manifest.record(t.step, t.seconds)
        except Exception as e:  # noqa: BLE001 - this step fails; the other pipelines go on
            t.state, t.error = "failed", str(e) if isinstance(e, QuantkitError) else _reason(e)
            self.say(t, f"failed: {t.error}")
            return
        t.state = "done"
        self.say(t, f"done in {t.seconds:.1f} s")

    def run(self) -> list[Task]:
        while True:
            changed = False
            for t in self.tasks:
                if t.state == "waiting" and any(d.state in ("failed", "blocked") for d in t.deps):
                    t.state, changed = "blocked", True
                    self.say(t, "not run: a step it reads failed")
                elif self._ready(t):
                    self.start(t)
                    changed = True
            if not self.parts:
                if not changed:
                    break
                continue
            done, _ = self.ray.wait(list(self.parts), num_returns=1, timeout=0.5)
            self._drain_events()
            for ref in done:
                self._finished(ref)
        self._drain_events()
        return self.tasks


def _reason(e: Exception) -> str:
    """One line for a failed task: our own error's text, or what Ray says happened to the worker."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, QuantkitError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def connect(address: str, settings: dict):
    """ray.init: an existing cluster at `address` ('auto': RAY_ADDRESS or the one running here), or a
    new one on this machine (''). The workers get this process's HF_* / QUANTKIT_* variables."""
    ray = import_ray()
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    kw: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR", "runtime_env": {"env_vars": env}}
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(include_dashboard=False, **kw)
    except Exception as e:  # noqa: BLE001 - ConnectionError, a Ray version mismatch, a port that is not Ray's
        raise InputError(f"--ray {address}: cannot connect to the Ray cluster ({' '.join(str(e).split())[:200]})") \
            from None
    return ray


def check_shared(ray, inv: Inventory, models: list[Model]) -> None:
    """Every node must see every input and every OUT: a file written to each OUT here is read on each
    node. The first node that cannot → one line naming the path and the node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    *_, sees = _remote()
    inputs = sorted({str(p) for m in models for s in m.plan.steps for p in s.inputs
                     if Path(p).exists() and not any(Path(o) == Path(p) or Path(o) in Path(p).parents
                                                     for s2 in m.plan.steps for o in s2.outputs)})
    tokens = {}
    try:
        for m in models:
            p = m.plan.out / f".quantkit-shared-{uuid.uuid4().hex}"
            p.write_text(p.name)
            tokens[str(p)] = p.name
        refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(inputs, tokens) for n in inv.nodes]
        try:
            seen = ray.get(refs, timeout=300)
        except Exception as e:  # noqa: BLE001 - a node that cannot run the check cannot run the steps
            raise InputError(f"the check that every node sees the inputs and outputs did not complete: {_reason(e)} "
                             "(is quantkit installed on every node?)") from None
        for r in seen:
            if r["missing"]:
                raise InputError(f"not visible from the Ray node on {r['host']} ({r['node'][:8]}): inputs and "
                                 "[output] dir must be on storage every node mounts at the same path (NFS, a "
                                 "shared volume)", r["missing"][0])
    finally:
        for p in tokens:
            Path(p).unlink(missing_ok=True)


def run(cfgs: list[Pipeline], labels: list[str], address: str | None, *, dry_run: bool = False, rehash: bool = False,
        echo: Callable[[str], None] = print) -> list[str]:
    """`quantkit run --ray`: check everything, connect, fan out, record; returns the summary lines.
    `address` None takes [cluster] address."""
    from . import pipeline as pl
    from .cli import _resolve_device
    import_ray()
    settings = cfgs[0]["cluster"]
    address = settings["address"] if address is None else address
    if address not in ("", "auto"):
        check_reachable(address)            # before the checks of the inputs, which take seconds
    for c in cfgs[1:]:
        if c["cluster"] != settings:
            raise InputError("the pipelines' [cluster] tables differ: give them one (the first file's is not "
                             "assumed for the others)", c.source)
    outs = [Path(c["output"]["dir"]).resolve() for c in cfgs]
    for i, o in enumerate(outs):
        if o in outs[:i]:
            raise InputError(f"two pipelines write to the same [output] dir {o}: give each its own", cfgs[i].source)
    models = []
    for cfg, label in zip(cfgs, labels):
        try:
            device = _resolve_device(cfg["output"]["device"], flag="", dry_run=True)
        except QuantkitError as e:
            raise cfg.error("output", "device", str(e)) from None
        if device.startswith("cuda:"):
            raise cfg.error("output", "device", f"{device!r}: on a cluster each task sees only the GPU Ray gives it; "
                            "use auto (a GPU where Ray gives one) or cpu")
        plan = pl.build(cfg, device, progress=False)
        models.append(Model(label, cfg, plan, Manifest.load(plan.out, trust_stats=not rehash)))
    ray = connect(address, settings)
    try:
        inv = Inventory.of(ray)
        unknown = [t for t in settings["measure_on"] if t not in inv.gpu_types]
        if unknown:
            raise cfgs[0].error("cluster", "measure_on", f"[cluster] measure_on: no node of the cluster has GPU type "
                                f"{unknown[0]!r} (it has: {', '.join(inv.gpu_types) or 'none'})")
        echo(inv.describe())
        mark_bench(models, measured_types(settings, inv))
        if dry_run:
            lines = []
            for m in models:
                lines += [f"{m.label}:"] + ["  " + x for x in pl.describe(m.plan, m.manifest)]
                lines += placement(m.plan.steps, settings, inv, m.cfg["output"]["device"])
            return lines
        for m in models:
            pl.require_disk(m.plan, m.manifest)
        with ExitStack() as stack:
            for m in models:
                stack.enter_context(pl.claim(m.plan.out))
            check_shared(ray, inv, models)
            t0 = time.perf_counter()
            tasks = Sweep(models, inv, settings, echo).run()
            wall = time.perf_counter() - t0
            for m in models:                  # what killed workers left: nothing runs now
                for p in m.plan.out.iterdir():
                    if pl._STALE.match(p.name):
                        pl.shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    finally:
        ray.shutdown()
    return summary(tasks, wall)


def summary(tasks: list[Task], wall: float) -> list[str]:
    """Per task: state, wall time (queued to recorded), the step's own time on its worker (the rest is
    waiting for a CPU, the worker's start and the plan's checks), attempts, node; then the failures."""
    w = max([len(t.key) for t in tasks] + [4])
    lines = [f"{'task':{w}}  {'state':8} {'wall':>8} {'in step':>8}  attempts  node"]
    for t in tasks:
        wall_t, inside = (f"{t.seconds:.1f} s", f"{t.inside:.1f} s") if t.state == "done" else ("", "")
        where = f"{t.host} {t.node[:8]}" if t.node else ""
        lines.append(f"{t.key:{w}}  {t.state:8} {wall_t:>8} {inside:>8}  {t.attempts or '':>8}  {where}")
    lines.append(f"{len(tasks)} tasks in {wall:.1f} s")
    failed = [t for t in tasks if t.state in ("failed", "blocked")]
    if failed:
        raise ClusterFailed(lines, [f"{t.key}: {t.error or 'a step it reads failed'}" for t in failed])
    return lines


class ClusterFailed(QuantkitError):
    """Some steps failed: the summary is printed, then this line; the other models' steps finished."""
    def __init__(self, lines: list[str], failures: list[str]):
        self.lines = lines
        super().__init__(f"{len(failures)} step(s) did not complete: " + "; ".join(failures))
