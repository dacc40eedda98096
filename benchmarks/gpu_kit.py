"""SGLang end to end on a borrowed GPU machine that has torch but no SGLang and no network: a
kit carried with the working tree, and one command there.

The machine (see ``benchmarks/README.md``, GPU kit) has Python 3.12, torch 2.11, Triton 3.6,
transformers 5.17 and torchvision 0.26; only the working tree reaches it (64 MiB in all). The
kit, built here with the package index:

* SGLang 0.5.23's cp312 wheel, trimmed: without its Rust extensions ``_server``, ``_bench``,
  ``_grpc``, ``_multimodal``, and ``multimodal_gen/`` and ``test/``, none of which a Python
  server run loads (39 MB -> 15 MB; its RECORD rewritten so pip installs it);
* the dependencies a Qwen2-VL server imports that the machine lacks (:data:`DEPENDENCIES`);
* ``sglang-kernel`` replaced by a stand-in wheel: ``sgl_kernel`` in plain PyTorch
  (:mod:`bacon_sglang.cpu_shim.cuda_standin`), since the real one (373 MB) is built against
  the torch SGLang pins and does not load on torch 2.11;

all under ``.gpu-kit/`` (ignored by git) with ``manifest.json`` (name, version, bytes, sha256).

    python benchmarks/gpu_kit.py build          # here: download, trim, write .gpu-kit/
    python benchmarks/gpu_kit.py check          # kit + tracked tree < 60 MiB, manifest intact
    bash benchmarks/gpu_kit.sh "$OUT"           # there: the one command (= gpu_kit.py run)
    python benchmarks/gpu_kit.py run --out DIR --dry-run   # here: the plan, nothing run

``run`` installs the kit and the project into a venv under /tmp (``--system-site-packages``:
the machine's torch, Triton and transformers), then within ``--budget`` seconds (default 540)
runs, each step time-boxed and its failure recorded (file:line, error) without stopping the
rest: the import of SGLang's server modules; ``tests/test_gpu_kit_e2e.py`` (the shipped-size
tiny model and a random-weight model at Qwen2-VL-7B attention shapes, Triton attention with
decode CUDA graphs: keep-sets equal to the transformers reference, greedy tokens equal, pool
whole); ``gpu_check.py --steps serving`` (none vs snapkv vs bacon on the 7B-shaped model); and
``gpu_check.py --steps compression-cost`` when its ``--help`` lists it. It writes
``gpu_kit.json`` and ``gpu_kit.md`` into ``--out``. Every time it measures runs SGLang's
norms and activations through the plain-PyTorch stand-ins (slower than the real kernels).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from common import markdown_table

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / ".gpu-kit"
MIB = 1 << 20
TREE_LIMIT = 30 * MIB  # the tracked files
TRAVEL_LIMIT = 60 * MIB  # tracked files + kit (the machine takes 64 MiB in all)
SGLANG = ("sglang", "0.5.23")
PYTHON_TAG = "3.12"
# manylinux tags the machine (glibc >= 2.34, x86-64) installs; SGLang's own wheel is 2_34.
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")  # fmt: skip
# Left out of SGLang's wheel: nothing a Python server run imports.
TRIM = (
    "sglang/srt/rust_extensions/_server.",
    "sglang/srt/rust_extensions/_bench.",
    "sglang/srt/rust_extensions/_grpc.",
    "sglang/srt/rust_extensions/_multimodal.",
    "sglang/multimodal_gen/",
    "sglang/test/",
)
# SGLang 0.5.23's dependencies that a Qwen2-VL server's modules import (traced in the CPU
# test environment: scheduler, model runner, qwen2_vl, the Triton backend, the HTTP server,
# the OpenAI chat entrypoint, the qwen_vl processor, xgrammar) and that torch 2.11, Triton
# 3.6, transformers 5.17 and torchvision 0.26 do not bring with them; the versions SGLang
# 0.5.23 resolves. Imported but optional there (the modules import with each one hidden),
# left out for size: mistral-common, pycountry, pydantic-extra-types, zstandard, lxml,
# torch-memory-saver, tiktoken, ml-dtypes. ``run`` skips any of these the machine has.
DEPENDENCIES = {
    "aiohappyeyeballs": "2.7.1", "aiohttp": "3.14.5", "aiosignal": "1.4.0",
    "apache-tvm-ffi": "0.1.11", "attrs": "26.1.0", "cffi": "2.1.1",
    "charset-normalizer": "3.5.3", "compressed-tensors": "0.18.0", "dill": "0.4.1",
    "distro": "1.9.0", "einops": "0.8.2", "fastapi": "0.165.0", "frozenlist": "1.8.0",
    "gguf": "0.19.0", "ipython": "9.19.1", "jsonschema": "4.26.0",
    "jsonschema-specifications": "2025.9.1", "loguru": "0.7.3", "msgspec": "0.23.0",
    "multidict": "7.2.1", "openai": "2.8.0", "opentelemetry-api": "1.45.3",
    "orjson": "3.13.0", "partial-json-parser": "0.2.1.1.post7", "propcache": "0.5.4",
    "psutil": "7.2.2", "pybase64": "1.5.1", "python-multipart": "0.0.34", "pyzmq": "27.3.0",
    "referencing": "0.37.0", "requests": "2.34.2", "rpds-py": "2026.9.1",
    "sentencepiece": "0.2.1", "setproctitle": "1.3.8", "sniffio": "1.3.1",
    "soundfile": "0.13.1", "starlette": "1.10.0", "traitlets": "5.16.1", "urllib3": "2.8.0",
    "uvicorn": "0.55.0", "uvloop": "0.23.0", "watchfiles": "1.3.0", "xgrammar": "0.2.7",
    "yarl": "1.25.1",
}  # fmt: skip
# The tests' runner, installed like the dependencies (only where the machine has none).
TEST_TOOLS = {"pytest": "9.2.0", "pluggy": "1.7.0", "iniconfig": "2.3.1", "pytest-timeout": "2.4.0"}
# The project's build requirements, for its editable install where the machine's Python has
# no setuptools (pip then builds in isolation from the kit).
BUILD_TOOLS = {"setuptools": "84.2.1", "wheel": "0.48.0", "packaging": "26.4"}
STANDIN = ("sglang-kernel", "0.0.0+bacon.standin")
STANDIN_SOURCE = REPO / "bacon_sglang" / "cpu_shim" / "cuda_standin"
# What the server runs need on the stand-in (see bacon_sglang.cpu_shim.cuda_standin).
SERVER_ENV = {"SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1", "TRITON_INTERPRET": "0"}
SERVER_ARGS = ("--attention-backend triton --mm-attention-backend triton_attn "
               "--sampling-backend pytorch")  # fmt: skip
# Decode graphs captured up to this batch only: each server start captures in seconds.
SERVING_GRAPH_BS = "32"
STANDIN_NOTE = (
    "measured with plain-PyTorch stand-ins for sgl_kernel's RMSNorm and SiLU-and-mul (several "
    "unfused kernels each): the forward is slower than real SGLang's, so any share of prefill "
    "time (compression cost) measured here is smaller than it would be there"
)
VENV = Path(tempfile.gettempdir()) / "bacon-gpu-kit-venv"
# SGLang modules a Qwen2-VL server loads (scheduler and model-runner processes, HTTP server).
SERVER_MODULES = (
    "sglang.srt.managers.scheduler", "sglang.srt.model_executor.model_runner",
    "sglang.srt.models.qwen2_vl", "sglang.srt.layers.attention.triton_backend",
    "sglang.srt.entrypoints.http_server", "sglang.srt.multimodal.processors.qwen_vl",
    "sglang.srt.layers.layernorm", "sglang.srt.layers.activation", "bacon_sglang.plugin",
)  # fmt: skip


# ---------------------------------------------------------------------------------- sizes


def tracked_bytes(repo: Path = REPO) -> int | None:
    """Bytes of the files git tracks under ``repo`` (working-tree sizes); None outside a
    git checkout."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    paths = [repo / p for p in listing.decode().split("\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------- wheels


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(path: Path, files: dict[str, bytes], name: str, version: str) -> Path:
    """Write a pure-Python wheel at ``path`` holding ``files`` (archive path -> bytes) plus
    its ``.dist-info`` (METADATA, WHEEL, RECORD with every file's hash); returns ``path``.
    The same files give the same bytes."""
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = dict(files)
    files[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    ).encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: bacon-sglang gpu_kit\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n"
    )
    record = [f"{p},{_record_hash(d)},{len(d)}" for p, d in files.items()]
    files[f"{dist_info}/RECORD"] = ("\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for member, data in files.items():  # fixed dates: the same files give the same wheel
            z.writestr(zipfile.ZipInfo(member, (1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    return path


def trim_wheel(source: Path, target: Path, prefixes: tuple[str, ...] = TRIM) -> dict:
    """Copy wheel ``source`` to ``target`` without the members whose path starts with one of
    ``prefixes``, and without their lines in its ``RECORD`` (so pip installs it); returns
    ``{"removed_files", "removed_bytes"}`` (uncompressed)."""
    removed, removed_bytes = set(), 0
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(prefixes):
                removed.add(info.filename)
                removed_bytes += info.file_size
        for info in src.infolist():
            if info.filename in removed:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                kept = [ln for ln in lines if ln.rsplit(",", 2)[0] not in removed]
                data = ("\n".join(kept) + "\n").encode()
            dst.writestr(info, data)
    return {"removed_files": len(removed), "removed_bytes": removed_bytes}


def standin_wheel(kit_wheels: Path) -> Path:
    """The ``sglang-kernel`` stand-in wheel: package ``sgl_kernel`` = the modules of
    :mod:`bacon_sglang.cpu_shim.cuda_standin` (they import the ops from bacon_sglang)."""
    files = {f"sgl_kernel/{p.name}": p.read_bytes() for p in sorted(STANDIN_SOURCE.glob("*.py"))}
    name, version = STANDIN
    wheel = kit_wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    return write_wheel(wheel, files, *STANDIN)


def pip_download(requirements: list[str], dest: Path) -> None:
    """Download the cp312 manylinux x86-64 wheels of ``requirements`` (no dependencies)."""
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--python-version", PYTHON_TAG, "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    subprocess.run(argv + requirements, check=True)


def wheel_name_version(path: Path) -> tuple[str, str]:
    """``(distribution name normalised with dashes, version)`` from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def manifest_entry(path: Path, role: str) -> dict:
    """One manifest row: file, distribution, version, role, bytes, sha256."""
    name, version = wheel_name_version(path)
    return {"file": path.name, "name": name, "version": version, "role": role,
            "bytes": path.stat().st_size, "sha256": sha256(path)}  # fmt: skip


def build(kit: Path = KIT, cache: Path | None = None) -> dict:
    """Download, trim and write the kit under ``kit``; returns the manifest it wrote."""
    cache = cache or Path(tempfile.gettempdir()) / "bacon-gpu-kit-cache"
    wheels = kit / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    name, version = SGLANG
    pip_download([f"{name}=={version}"], cache / "sglang")
    full = next((cache / "sglang").glob(f"{name}-{version}-cp312-*.whl"))
    trimmed = wheels / full.name
    trim = trim_wheel(full, trimmed)
    roles = {**dict.fromkeys(DEPENDENCIES.items(), "dependency"),
             **dict.fromkeys(TEST_TOOLS.items(), "dependency"),
             **dict.fromkeys(BUILD_TOOLS.items(), "build")}  # fmt: skip
    pip_download([f"{n}=={v}" for n, v in roles], cache / "deps")
    rows = [manifest_entry(trimmed, "sglang (trimmed)"), manifest_entry(standin_wheel(wheels),
            "sgl_kernel stand-in")]  # fmt: skip
    for path in sorted((cache / "deps").glob("*.whl")):
        if wheel_name_version(path) in roles:
            shutil.copy2(path, wheels / path.name)
            rows.append(manifest_entry(wheels / path.name, roles[wheel_name_version(path)]))
    missing = set(roles) - {(r["name"], r["version"]) for r in rows}
    if missing:
        raise RuntimeError(f"no cp312 wheel downloaded for {sorted(missing)}")
    manifest = {
        "python": PYTHON_TAG,
        "platforms": list(PLATFORMS),
        "sglang_full_bytes": full.stat().st_size,
        "trimmed": {"prefixes": list(TRIM), **trim},
        "files": rows,
        "bytes": sum(r["bytes"] for r in rows),
    }
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def check(kit: Path = KIT, repo: Path = REPO) -> list[str]:
    """Problems with the kit (an empty list when it is whole): a file missing, changed or
    not listed in the manifest; tracked files over :data:`TREE_LIMIT`; kit + tracked files
    over :data:`TRAVEL_LIMIT`."""
    problems = []
    manifest_path = kit / "manifest.json"
    if not manifest_path.exists():
        return [f"{manifest_path}: missing (run: python benchmarks/gpu_kit.py build)"]
    manifest = json.loads(manifest_path.read_text())
    listed = {r["file"]: r for r in manifest["files"]}
    for file, row in listed.items():
        path = kit / "wheels" / file
        if not path.exists():
            problems.append(f"{file}: in the manifest, not in the kit")
        elif path.stat().st_size != row["bytes"] or sha256(path) != row["sha256"]:
            problems.append(f"{file}: size or sha256 differs from the manifest")
    for path in sorted((kit / "wheels").glob("*")):
        if path.name not in listed:
            problems.append(f"{path.name}: in the kit, not in the manifest")
    kit_bytes = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    tree = tracked_bytes(repo)
    if tree is not None:
        if tree > TREE_LIMIT:
            problems.append(f"tracked files {tree / MIB:.1f} MiB > {TREE_LIMIT / MIB:.0f} MiB")
        if tree + kit_bytes > TRAVEL_LIMIT:
            problems.append(
                f"tracked files + kit {(tree + kit_bytes) / MIB:.1f} MiB > "
                f"{TRAVEL_LIMIT / MIB:.0f} MiB"
            )
    return problems


# ---------------------------------------------------------------------------------- install


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def create_venv(venv: Path, python: str = "python3") -> list[str]:
    """Create ``venv`` with the system's site packages visible; returns the pip command to
    use for it (the venv's own pip, or the base interpreter's ``pip --python`` when the
    venv could not get one)."""
    if venv.exists():
        shutil.rmtree(venv)
    made = subprocess.run([python, "-m", "venv", "--system-site-packages", str(venv)],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode == 0:
        return [str(venv_python(venv)), "-m", "pip"]
    subprocess.run([python, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True)  # fmt: skip
    return [python, "-m", "pip", "--python", str(venv_python(venv))]


def installed(python: Path, names: list[str]) -> set[str]:
    """Which of the distributions ``names`` the interpreter ``python`` already has."""
    code = (
        "import json, sys\nfrom importlib.metadata import version\nfound = []\n"
        "for n in sys.argv[1:]:\n    try:\n        version(n); found.append(n)\n"
        "    except Exception:\n        pass\nprint(json.dumps(found))"
    )
    out = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return set(json.loads(out.stdout))


def install(kit: Path, venv: Path, pip: list[str], project: Path | None = REPO) -> dict:
    """Install the kit's wheels into ``venv`` offline (``--no-index --no-deps``): SGLang and
    the stand-in always, each dependency only where the venv does not already see it; then
    ``project`` editable, built with the machine's setuptools, or in isolation from the
    kit's build tools where it has none. Returns what it installed and skipped."""
    rows = json.loads((kit / "manifest.json").read_text())["files"]
    deps = [r for r in rows if r["role"] == "dependency"]
    present = installed(venv_python(venv), [r["name"] for r in deps])
    chosen = [r for r in rows if r["role"] != "build" and r["name"] not in present]
    offline = ["install", "--no-index", "--no-deps", "--find-links", str(kit / "wheels")]
    subprocess.run(pip + offline + [str(kit / "wheels" / r["file"]) for r in chosen], check=True)
    done = {"installed": [r["file"] for r in chosen], "present": sorted(present)}
    if project is not None:
        has_setuptools = bool(installed(venv_python(venv), ["setuptools"]))
        isolation = ["--no-build-isolation"] if has_setuptools else []
        subprocess.run(pip + offline + isolation + ["-e", str(project)], check=True)
        done["project_build"] = "machine's setuptools" if has_setuptools else "kit, isolated"
    return done


# ---------------------------------------------------------------------------------- run


def error_site(output: str) -> str | None:
    """``file:line: error`` of the last Python traceback in ``output``; without one, its
    last line (None for no output)."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', output)
    if not frames:
        return output.strip().splitlines()[-1] if output.strip() else None
    errors = re.compile(r"^[A-Za-z_.]+(Error|Exception|Exit)\b")
    lines = [ln for ln in output.strip().splitlines() if errors.match(ln)]
    file, line = frames[-1]
    short = file.split("site-packages/")[-1]
    return f"{short}:{line}: {lines[-1] if lines else output.strip().splitlines()[-1]}"


RUN_TAG = "BACON_GPU_KIT_RUN"


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL every process whose environment holds ``RUN_TAG=tag``: the servers a step
    started (in sessions of their own) that a timeout left behind. Returns their pids."""
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{RUN_TAG}={tag}".encode() in environ:
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
    return killed


def run_step(name: str, argv: list[str], timeout: float, env: dict, cwd: Path = REPO) -> dict:
    """Run one step's command (tagged in its environment, so that what it leaves running is
    killed afterwards); its status, seconds, output tail and, on failure, where."""
    start = time.perf_counter()
    if timeout < 30:
        return {"step": name, "ok": False, "status": "skipped: out of time", "seconds": 0.0,
                "argv": argv}  # fmt: skip
    tag = f"{os.getpid()}-{name}"
    # Output to a file, not a pipe: a process the step leaves behind may hold it open.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env={**env, RUN_TAG: tag}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timeout after {timeout:.0f} s"
        log.seek(0)
        output = log.read()
    left = kill_tagged(tag)
    seconds = time.perf_counter() - start
    step = {"step": name, "ok": status == 0, "status": status, "seconds": round(seconds, 1),
            "argv": argv, "output_tail": output[-4000:], "killed_left_over": left}  # fmt: skip
    if status != 0:
        step["error"] = error_site(output)
    print(f"gpu_kit: {name}: {'ok' if status == 0 else f'FAILED ({status})'} in {seconds:.0f} s",
          flush=True)  # fmt: skip
    return step


# (step, share of the time left it may take at most, cap in seconds)
STEPS = (("install", 1.0, 180), ("import", 1.0, 90), ("e2e", 0.5, 200),
         ("serving", 0.85, 240), ("compression-cost", 1.0, 90))  # fmt: skip


def step_commands(python: str, out: Path, layers: int) -> dict[str, list[str]]:
    """The commands of the steps after ``install`` (run from the repository root)."""
    serving = [
        "--server-args", f"{SERVER_ARGS} --cuda-graph-max-bs-decode {SERVING_GRAPH_BS}",
        "--max-total-tokens", "16384", "--levels", "1", "8",
        "--rounds", "1", "--rates", "8", "--rate-requests", "16", "--prefill-sizes", "448",
        "896", "--prefill-repeats", "1", "--output-tokens", "64",
        "--capacity-output-tokens", "128",
    ]  # fmt: skip
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)"
    return {
        "import": [python, "-c", code, *SERVER_MODULES],
        "e2e": [python, "-m", "pytest", "-x", "-q", "-rA", "-p", "no:cacheprovider",
                "tests/test_gpu_kit_e2e.py"],
        "serving": [python, "benchmarks/gpu_check.py", "--steps", "serving", "--layers",
                    str(layers), "--out", str(out / "gpu_check_serving.json"),
                    "--serving-args", shlex.join(serving)],
        "compression-cost": [python, "benchmarks/gpu_check.py", "--steps", "compression-cost",
                             "--layers", str(layers), "--out", str(out / "gpu_check_cost.json")],
    }  # fmt: skip


def versions_of(python: str) -> dict:
    """GPU, torch, Triton, transformers and Python versions as ``python`` sees them."""
    code = (
        "import json, platform, torch, triton, transformers\n"
        "gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None\n"
        "print(json.dumps({'gpu': gpu, 'python': platform.python_version(), "
        "'torch': torch.__version__, 'cuda': torch.version.cuda, 'triton': triton.__version__, "
        "'transformers': transformers.__version__}))"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}


def run(args: argparse.Namespace) -> dict:
    """Install, then every step within ``args.budget`` seconds; writes and returns the report."""
    start = time.monotonic()
    deadline = start + args.budget
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = str(venv_python(args.venv))
    env = {**os.environ, **SERVER_ENV, "BACON_E2E_LAYERS": str(args.layers)}
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": versions_of(args.python),
        "kit": {"problems": check(args.kit)},
        "server_env": SERVER_ENV,
        "server_args": SERVER_ARGS,
        "standin_ops": STANDIN_NOTE,
        "budget_s": args.budget,
        "steps": [],
    }
    commands = step_commands(python, out, args.layers)
    for name, share, cap in STEPS:
        left = deadline - time.monotonic() - 10
        timeout = min(cap, share * left)
        if args.dry_run:
            argv = commands.get(name, ["install", str(args.kit), str(args.venv)])
            report["steps"].append({"step": name, "ok": None, "status": "dry run",
                                    "timeout_s": round(timeout), "argv": argv})  # fmt: skip
            deadline -= timeout  # the plan: each step uses its whole box
            continue
        if name == "install":
            step = install_step(args, timeout)
        elif name == "compression-cost" and not lists_compression_cost(python):
            step = {"step": name, "ok": None, "status": "not in gpu_check.py --help"}
        else:
            argv = commands[name]
            if "benchmarks/gpu_check.py" in argv:  # its own time box ends first, cleanly
                argv = [*argv, "--step-timeout", str(max(timeout - 20, 10))]
            step = run_step(name, argv, timeout, env)
        if name == "serving" and (out / "serving" / "serving.json").exists():
            # serving.py writes its JSON before its plots (matplotlib may be missing there)
            step["serving"] = json.loads((out / "serving" / "serving.json").read_text())
        report["steps"].append(step)
        write(report, out)
    report["seconds"] = round(time.monotonic() - start, 1)
    write(report, out)
    return report


def install_step(args: argparse.Namespace, timeout: float) -> dict:
    """Create the venv and install the kit and the project, as one recorded step."""
    start = time.perf_counter()
    try:
        pip = create_venv(args.venv, args.python)
        done = install(args.kit, args.venv, pip)
        return {"step": "install", "ok": True, "status": 0, **done,
                "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        output = getattr(exc, "stderr", None) or str(exc)
        return {"step": "install", "ok": False, "status": "failed", "error": str(exc)[-1000:],
                "output_tail": str(output)[-4000:],
                "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def lists_compression_cost(python: str) -> bool:
    """Whether ``gpu_check.py --help`` offers the ``compression-cost`` step."""
    done = subprocess.run([python, "benchmarks/gpu_check.py", "--help"], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    return re.search(r"--steps \{[^}]*\bcompression-cost\b", done.stdout) is not None


def write(report: dict, out: Path) -> None:
    """``gpu_kit.json`` and ``gpu_kit.md`` (:func:`render`) into ``out``."""
    (out / "gpu_kit.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_kit.md").write_text(render(report) + "\n")


# ---------------------------------------------------------------------------------- report


def _serving_rows(step: dict) -> list[str]:
    """Per policy, from ``benchmarks/serving.py``'s JSON: TTFT (1 client), prefill time of the
    longest prompt, decode step (batch 1), KV slots at 8 clients, and requests decoding at
    once in the burst into the fixed pool (with the pool's bound)."""
    data = step.get("serving")
    if not data:
        return []
    cells: dict[str, dict] = {}
    for row in data.get("sweep", []):
        cell = cells.setdefault(row["policy"], {})
        if row.get("concurrency") == 1:
            cell["ttft"] = row.get("ttft_p50_ms")
        if row.get("concurrency") == 8:
            cell["kv"] = row.get("kv_peak")
    for row in data.get("prefill", []):
        cell = cells.setdefault(row["policy"], {})
        if row.get("prompt_tokens", 0) >= cell.get("tokens", 0):
            cell["tokens"], cell["prefill"] = row.get("prompt_tokens"), row.get("prefill_p50_ms")
    for row in data.get("decode", []):
        if row.get("batch") == 1:
            cells.setdefault(row["policy"], {})["decode"] = row.get("step_ms")
    for row in data.get("capacity", []):
        cells.setdefault(row["policy"], {})["running"] = (
            f"{row.get('max_running')} ({row.get('pool_bound')})"
        )

    def fmt(value):
        return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)

    header = (
        "policy", "TTFT p50 ms, 1 client", "prefill p50 ms (prompt tokens)",
        "decode step ms, batch 1", "KV slots peak, 8 clients",
        "decoding at once in the pool (bound)",
    )  # fmt: skip
    rows = [
        (
            policy,
            fmt(c.get("ttft")),
            f"{fmt(c.get('prefill'))} ({fmt(c.get('tokens'))})",
            fmt(c.get("decode")),
            fmt(c.get("kv")),
            fmt(c.get("running")),
        )  # fmt: skip
        for policy, c in cells.items()
    ]
    return markdown_table(header, rows).splitlines()


def render(report: dict) -> str:
    """Markdown of a ``gpu_kit.json`` report: machine, each step's outcome (with where it
    failed), the serving table, and the stand-in note."""
    m = report.get("machine", {})
    lines = [
        "# SGLang end to end on the GPU kit (`benchmarks/gpu_kit.py run`)",
        "",
        f"{m.get('gpu') or 'no GPU'}; Python {m.get('python')}, torch {m.get('torch')} "
        f"(CUDA {m.get('cuda')}), Triton {m.get('triton')}, transformers "
        f"{m.get('transformers')}; {report.get('date')}; budget {report.get('budget_s')} s."
        + (
            f" Machine probe failed: {m['error'].strip().splitlines()[-1]}"
            if m.get("error")
            else ""
        ),
        "",
        f"Server flags: `{report.get('server_args')}`; every number was {report['standin_ops']}.",
        "",
    ]
    steps = []
    for step in report["steps"]:
        ok = {True: "ok", False: f"FAILED ({step.get('status')})", None: step.get("status")}
        where = (step.get("error") or "").replace("|", "\\|").replace("\n", " ")
        steps.append((step["step"], ok[step.get("ok")], step.get("seconds", "-"), where))
    lines += markdown_table(("step", "outcome", "seconds", "where it failed"), steps).splitlines()
    serving = next((s for s in report["steps"] if s["step"] == "serving"), {})
    table = _serving_rows(serving)
    if table:
        lines += ["", "Serving, random-weight Qwen2-VL at 7B attention shapes:", "", *table]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("command", choices=("build", "check", "run"))
    parser.add_argument("--kit", type=Path, default=KIT, help="kit folder (default .gpu-kit/)")
    parser.add_argument("--cache", type=Path, help="download cache for build")
    parser.add_argument("--out", type=Path, help="run: results folder (the machine's $OUT)")
    parser.add_argument("--venv", type=Path, default=VENV, help="run: venv to create")
    parser.add_argument(
        "--python", default="python3", help="run: the interpreter with the machine's torch"
    )
    parser.add_argument("--budget", type=float, default=540.0, help="run: seconds in all")
    parser.add_argument("--layers", type=int, default=2, help="run: layers of the 7B-shaped model")
    parser.add_argument("--dry-run", action="store_true", help="run: the plan only")
    args = parser.parse_args(argv)
    if args.command == "run" and args.out is None:
        parser.error("run needs --out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "build":
        manifest = build(args.kit, args.cache)
        print(f"gpu_kit: {len(manifest['files'])} wheels, {manifest['bytes'] / MIB:.1f} MiB "
              f"in {args.kit}")  # fmt: skip
    if args.command in ("build", "check"):
        problems = check(args.kit)
        tree = tracked_bytes() or 0
        verdict = "; ".join(problems) if problems else "kit whole, sizes within limits"
        print(f"gpu_kit: tracked files {tree / MIB:.1f} MiB; {verdict}")
        return 1 if problems else 0
    report = run(args)
    bad = [s["step"] for s in report["steps"] if s.get("ok") is False]
    print(f"gpu_kit: wrote {args.out / 'gpu_kit.json'}; failed: {', '.join(bad) or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
