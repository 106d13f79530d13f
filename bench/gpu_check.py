"""One call on a GPU machine: build the extension with CUDA, run every CUDA test and the GPU benchmarks, one JSON report.

    bench/gpu_check.sh [--out DIR] [--budget-s 450] [--dry-run]

Stages, in order, each under its own time limit and all under one overall budget (default 450 s, so the whole
check fits in 8 minutes on one H100/H200): env (nvidia-smi, torch), build (`pip install --no-build-isolation
--no-deps -e .` against the machine's torch, CUDA compiled for the visible GPU's architecture only), import
(the built _C has its CUDA kernels), tests (`pytest -m cuda`), then the GPU benchmarks at small sizes. A stage
that fails or runs out of time is recorded and the next one still runs; the report is written however the run
ends. The report is DIR/gpu_check.json (DIR: --out, else $OUT, else ./gpu_check_out); the exit status is 0
only when every stage passed.

The install is editable because the tests and the benchmarks import the checkout itself (`python -m pytest`
puts the working directory first on sys.path, the benchmarks put the repository root there), so the freshly
built _C must land beside the checkout's sources.

--dry-run checks this script on a machine without a GPU: no build (the checkout's current _C is used), the
same stages on the CPU (the CUDA tests then all skip), benchmarks at their smallest sizes.

Only the standard library is imported here, so a broken torch or build still yields a report.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT_NAME = "gpu_check.json"
LOG_TAIL_CHARS = 4000
# Time kept back from each stage so the ones after it (and the report) still get to run.
RESERVE_S = 20

TORCH_INFO = """
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu_visible": torch.cuda.is_available()}
if info["gpu_visible"]:
    major, minor = torch.cuda.get_device_capability()
    info.update(gpu=torch.cuda.get_device_name(), capability=f"{major}.{minor}")
print(json.dumps(info))
"""

EXTENSION_INFO = """
import json
import fast_inference, fast_inference._C as _C, fast_inference.ops as ops
print(json.dumps({"package": fast_inference.__file__, "extension": _C.__file__,
                  "cuda_ops": ops.cuda_ops_available(), "cpu_isa": _C.cpu_isa()}))
"""


@dataclass
class Stage:
    name: str
    argv: list[str]
    limit_s: float
    env: dict = field(default_factory=dict)
    # Set by run_stage.
    status: str = "not run"  # ok | failed | timeout | skipped | not run
    rc: int | None = None
    seconds: float = 0.0
    output: str = ""


def run_stage(stage: Stage, deadline: float) -> None:
    """Run the stage's command in its own process group, killed (group and all) at its limit."""
    limit = min(stage.limit_s, deadline - time.monotonic() - RESERVE_S)
    if limit <= 0:
        stage.status, stage.limit_s = "skipped", 0
        stage.output = "the overall time budget was spent before this stage"
        return
    stage.limit_s = round(limit, 1)
    # The checkout first on sys.path: the tests and benchmarks import it (and bench.common) from there.
    pythonpath = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath, **stage.env}
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            stage.argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as exc:
        stage.status, stage.output = "failed", f"could not start {stage.argv[0]}: {exc}"
        return
    try:
        stage.output, _ = proc.communicate(timeout=limit)
        stage.rc = proc.returncode
        stage.status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stage.output, _ = proc.communicate()
        stage.rc, stage.status = proc.returncode, "timeout"
    stage.seconds = round(time.monotonic() - started, 1)
    print(f"gpu_check: {stage.name}: {stage.status} in {stage.seconds} s", file=sys.stderr, flush=True)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def json_lines(text: str) -> list[dict]:
    """The JSON objects a benchmark printed one per line (bench.common.emit), other lines ignored."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def junit_summary(path: Path) -> dict:
    """Counts and the names of failed/errored cases from pytest's JUnit XML; collection errors apart."""
    if not path.is_file():
        return {"error": f"pytest wrote no {path.name}"}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "collection_errors": 0}
    problems = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = ".".join(filter(None, (case.get("classname"), case.get("name"))))
        kinds = {child.tag: child for child in case}
        if "error" in kinds and kinds["error"].get("message", "") == "collection failure":
            counts["collection_errors"] += 1
            problems.append({"collection_error": name, "message": (kinds["error"].text or "")[-600:]})
        elif "failure" in kinds or "error" in kinds:
            key = "failed" if "failure" in kinds else "errors"
            counts[key] += 1
            node = kinds.get("failure", kinds.get("error"))
            problems.append({key: name, "message": (node.get("message") or "")[:600]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "problems": problems}


def plan(args, work: Path, capability: str | None) -> list[Stage]:
    py = sys.executable
    junit = work / "junit.xml"
    gpu = "cpu" if args.dry_run else "cuda"
    build_env = {"FI_TARGET_DEVICE": "cuda", "MAX_JOBS": str(os.cpu_count() or 4)}
    if capability:
        build_env["TORCH_CUDA_ARCH_LIST"] = capability  # only the visible GPU's: half the compile time
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        build_env["CUDA_HOME"] = "/usr/local/cuda"
    pip = [py, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."]
    stages = [] if args.dry_run else [Stage("build", pip, 300, build_env)]
    stages += [
        Stage("import", [py, "-c", EXTENSION_INFO], 60),
        Stage(
            "tests",
            [
                py,
                "-m",
                "pytest",
                "-m",
                "cuda",
                "tests",
                "-q",
                "-rfE",
                "-p",
                "no:cacheprovider",
                "--continue-on-collection-errors",
                f"--junitxml={junit}",
            ],
            180,
        ),
    ]
    small = args.dry_run
    benches = {
        "bench_paged_attention": ["--device", gpu, "--iters", "3" if small else "10"]
        + (["--cases", "decode"] if small else []),
        "bench_sampling": ["--device", gpu, "--vocab", "4096" if small else "32768"],
        "bench_cache_ops": ["--device", gpu],
        "bench_serving": ["--device", gpu, "--concurrency", "1", "8", "--output-len", "8" if small else "16"]
        + (["--num-prompts", "4"] if small else []),
    }
    for name, flags in benches.items():
        stages.append(Stage(name, [py, str(ROOT / "bench" / f"{name}.py"), *flags], 60))
    return stages


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="report directory")
    parser.add_argument("--budget-s", type=float, default=450.0, help="overall time limit, seconds")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: check this script on the CPU")
    args = parser.parse_args()
    started = time.monotonic()
    deadline = started + args.budget_s
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fi_gpu_check_"))  # pytest's XML: outside DIR, which holds one report
    report = {
        "report": "fast_inference gpu_check",
        "dry_run": args.dry_run,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_s": args.budget_s,
        "host": {"machine": platform.machine(), "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "git": _git_head(),
        "stages": {},
    }
    stages: list[Stage] = []
    try:
        env_stages = [Stage("torch", [sys.executable, "-c", TORCH_INFO], 60)]
        if not args.dry_run:
            query = ["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            env_stages.insert(0, Stage("nvidia-smi", ["nvidia-smi", *query], 30))
        for stage in env_stages:
            run_stage(stage, deadline)
        stages += env_stages
        torch_stage = env_stages[-1]
        torch_info = (json_lines(torch_stage.output) or [{}])[-1]
        report["torch"] = torch_info
        if not args.dry_run and not torch_info.get("gpu_visible"):
            # Without a GPU the CUDA tests would only skip: say so instead of reporting a green run.
            torch_stage.status = "failed"
            torch_stage.output += "\nno GPU is visible to torch (--dry-run checks this script on a CPU)"
        for stage in plan(args, work, torch_info.get("capability")):
            stages.append(stage)
            run_stage(stage, deadline)
            if stage.name == "import":
                report["extension"] = (json_lines(stage.output) or [{}])[-1]
                if stage.status == "ok" and not args.dry_run and not report["extension"].get("cuda_ops"):
                    stage.status = "failed"  # built, but without the CUDA kernels
            elif stage.name == "tests":
                report["tests"] = junit_summary(work / "junit.xml")
                if stage.status == "ok" and report["tests"].get("collection_errors"):
                    stage.status = "incomplete"  # some test files did not import: their CUDA cases never ran
            elif stage.name.startswith("bench_"):
                report.setdefault("benchmarks", {})[stage.name] = json_lines(stage.output)
    finally:
        for stage in stages:
            report["stages"][stage.name] = {
                "status": stage.status,
                "rc": stage.rc,
                "seconds": stage.seconds,
                "limit_s": stage.limit_s,
                "command": " ".join(stage.argv),
                "output_tail": stage.output[-LOG_TAIL_CHARS:]
                if stage.status != "ok" or stage.name == "tests"
                else stage.output[-600:],
            }
        report["seconds"] = round(time.monotonic() - started, 1)
        report["ok"] = bool(stages) and all(s.status == "ok" for s in stages)
        shutil.rmtree(work, ignore_errors=True)
        path = out / REPORT_NAME
        path.write_text(json.dumps(report, indent=1) + "\n")
        summary = ", ".join(f"{s.name}={s.status}" for s in stages)
        print(f"gpu_check: {'OK' if report['ok'] else 'NOT OK'} in {report['seconds']} s ({summary}); {path}")
    return 0 if report["ok"] else 1


def _git_head() -> dict:
    def git(*argv: str) -> str:
        try:
            run = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return run.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


if __name__ == "__main__":
    sys.exit(main())
