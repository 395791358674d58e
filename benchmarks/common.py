"""What every benchmark section shares: the sizes of a run, the staged images, machine facts, timing helpers,
and peak-memory measurements in a child process.

All numbers a section reports are ratios of figures measured side by side in the same run (absolute times on a
shared 2-core machine are noisy); the absolute figures are kept in the tables for context.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_IMAGES = ROOT / "data" / "hymenoptera-small"
# The full-size photos are too large to ship: `make bench` reads them from ../shared (or SHARED_DIR) when present.
SHARED = Path(os.environ.get("SHARED_DIR", ROOT.parent / "shared"))
LITE0_NAME = "efficientnet_lite0/efficientnet_lite0_imagenet.keras"
IMAGE_SUFFIXES = (".jpg", ".jpeg")  # what image_dataset_from_directory and the naive cv2 loop both read


@dataclass(frozen=True)
class Sizes:
    """How many images / samples each section uses. `full` keeps `make bench` within about an hour on 2 cores."""

    throughput_images: dict[str, int]  # section 1, per model case
    steady_cases: tuple[str, ...]  # section 2 groups (whole processes on N and 2N images)
    steady_seconds: float  # section 2: the extra work of a 2N run over its N run, long against start-up noise
    steady_range: tuple[int, int]  # section 2: bounds of N
    steady_rounds: int  # section 2: every process of a group is run this often, interleaved; the fastest time counts
    memory_images: int  # N of sections 2 and 3 (4N is also run)
    memory_batch: int
    memory_size: int  # input side for the VGG19 block2_pool memory runs
    storage_images: int  # real images whose features section 4 stores (tiled to storage_rows)
    storage_rows: int
    head_epochs: int  # section 5: end-to-end epochs trained (the first one is the untimed warm-up)
    scaling_samples: int  # section 6: N (2N and 4N are also run)
    scaling_dims: tuple[int, ...]
    scaling_budget_s: float  # a head slower than this at one size is not run at the larger sizes
    batch_size: int = 32
    registry_size: int | None = None  # quick mode: a small input side for ResNet50 / VGG19 (Lite0 keeps 224)
    jit_probe: bool = True  # section 1: also time the model with XLA (compiling costs minutes on 2 cores)
    split_images: int | None = None  # section 5: None uses every image; else this many per split (staged copies)
    cases: tuple[str, ...] = ("lite0", "resnet50", "vgg19_block2_pool", "vit_b16")  # section 1 models
    memory_dtypes: tuple[str, ...] = ("float32", "float16")  # section 3
    scaling_heads: str = "all"  # section 6: 'all' or comma-separated head names
    update_images: int = 2000  # section 8: N of the full run (1% of N is added for the first update)
    scale_images: tuple[int, ...] = (10_000, 100_000, 300_000)  # section 10: N of each run (SCALE_IMAGES=...,1000000)
    scale_tiny_shards: int = 1000  # section 10: shards of 2 images merged
    full_size_images: bool = True  # the full-size photos of ../shared when present; False: the shipped copies
    # section 9 (benchmarks/engines.py): images per model for auto vs the explicit engines, and for int8 vs float32
    # (None: every photo of the set); the linear probe runs on the first int8 model (Lite0), repeated 4-fold CV
    engine_images: dict[str, int] = field(default_factory=lambda: {"lite0": 256, "resnet50": 96,
                                                                   "vgg19_block2_pool": 96})
    int8_images: dict[str, int | None] = field(default_factory=lambda: {"lite0": None, "vgg19_block2_pool": 96})
    probe_repeats: int = 5

    @classmethod
    def full(cls) -> "Sizes":
        return cls(throughput_images={"lite0": 128, "resnet50": 96, "vgg19_block2_pool": 96, "vit_b16": 64},
                   steady_cases=("lite0", "lite0_photos", "vgg19_block2_pool", "lite0_12mp"), steady_seconds=20.0,
                   steady_range=(16, 3000), steady_rounds=2,
                   memory_images=32, memory_batch=16, memory_size=256, storage_images=64, storage_rows=512,
                   head_epochs=3, scaling_samples=200, scaling_dims=(64, 256, 1280, 5120), scaling_budget_s=10.0)

    @classmethod
    def quick(cls) -> "Sizes":
        """The smoke test: every code path, tiny inputs, about a minute."""
        return cls(throughput_images={"lite0": 8, "resnet50": 8, "vgg19_block2_pool": 8},
                   steady_cases=("vgg19_block2_pool",), steady_seconds=0.2, steady_range=(4, 8), steady_rounds=1,
                   memory_images=4, memory_batch=4, memory_size=32, storage_images=8, storage_rows=32,
                   head_epochs=2, scaling_samples=60, scaling_dims=(16, 64), scaling_budget_s=2.0, batch_size=8,
                   registry_size=32, jit_probe=False, split_images=8, cases=("vgg19_block2_pool",),
                   memory_dtypes=("float16",), scaling_heads="ridge,knn,sgd", update_images=100,
                   scale_images=(100, 200), scale_tiny_shards=4,
                   full_size_images=False, engine_images={"vgg19_block2_pool": 8},
                   int8_images={"vgg19_block2_pool": 16}, probe_repeats=1)


@dataclass
class Section:
    """One section of results.md: a table, the target, whether it is met, and why."""

    number: int
    title: str
    target: str
    columns: list[str]
    rows: list[dict] = field(default_factory=list)
    met: bool | None = None  # None: not applicable / not run
    value: str = ""  # the headline figure compared with the target
    notes: list[str] = field(default_factory=list)
    extra_tables: list[tuple[str, list[str], list[dict]]] = field(default_factory=list)  # (caption, columns, rows)
    plots: list[str] = field(default_factory=list)


@dataclass
class Sources:
    """Where the real images and the pretrained Lite0 come from in this run."""

    images: Path  # a folder of class folders, possibly with train/val splits above them
    lite0: Path
    real: bool  # False: the shipped downscaled copies in the repository

    @property
    def note(self) -> str:
        model = (f"model: {self.lite0} (the repository's copy: it carries the sidecar JSON that declares its "
                 f"preprocessing; byte-identical to ../shared/models/{LITE0_NAME} when that exists)")
        if self.real:
            return f"real data: {self.images} (replicated as needed); {model}"
        return (f"the shipped copies {self.images}; {model}. These JPEGs are downscaled (about 256x384), so "
                f"decoding is cheaper than on the full-size photos.")


def find_sources(full_size: bool = True) -> Sources:
    """The full-size photos of ../shared when asked for and present, else the shipped downscaled copies (quick runs
    and the tests always use the shipped ones, so they do not depend on what lies beside the repository)."""
    lite0 = ROOT / "models" / LITE0_NAME
    shared_images = SHARED / "datasets" / "hymenoptera"
    if full_size and shared_images.is_dir():
        return Sources(shared_images, lite0, True)
    if full_size:
        print(f"note: {shared_images} is absent; the real-data parts run on the shipped data/hymenoptera-small "
              f"instead.", file=sys.stderr)
    return Sources(SHIPPED_IMAGES, lite0, False)


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def stage_images(source: Path, n: int, dest: Path, link: bool = False) -> Path:
    """`dest/<class>/<k>_<name>`: the source JPEGs copied until there are n, taking the classes in turn (real
    files on disk, balanced class folders, so a Keras directory reader and our catalog both see labels). `link`:
    hard links where the file system allows (thousands of images at no disk cost; read from the page cache alike)."""
    files = list_images(source)
    if not files:
        raise FileNotFoundError(f"no JPEG images under {source}; expected class folders of .jpg files.")
    by_class: dict[str, list[Path]] = {}
    for path in files:
        by_class.setdefault(path.parent.name, []).append(path)
    groups = list(by_class.values())
    if dest.exists():
        shutil.rmtree(dest)
    for k in range(n):
        group = groups[k % len(groups)]
        src = group[(k // len(groups)) % len(group)]
        target = dest / src.parent.name / f"{k:05d}_{src.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not link:
                raise OSError
            os.link(src, target)
        except OSError:
            shutil.copyfile(src, target)
    return dest


def machine_facts() -> dict[str, str]:
    import keras
    import tensorflow as tf

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text)
    except OSError:
        pass
    ram = "unknown"
    try:
        import psutil

        ram = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    gpu = "none"
    if gpus:
        names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
        gpu = ", ".join(names)
    import cv2
    import h5py
    import numpy as np
    import sklearn

    commit = git_state()
    return {
        "CPU": f"{cpu} ({flags})" if flags else cpu,
        "cores": f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable by this process",
        "RAM": ram,
        "GPU": gpu,
        "Python": platform.python_version(),
        "TensorFlow / Keras": f"{tf.__version__} / {keras.__version__}",
        "h5py / NumPy / scikit-learn / OpenCV": f"{h5py.__version__} / {np.__version__} / {sklearn.__version__} / "
                                                f"{cv2.__version__}",
        "date (UTC)": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load average at start (1, 5, 15 min)": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
        "git commit": commit,
        "ONNX Runtime": _version("onnxruntime"),
    }


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def git_state() -> str:
    """The exact commit and whether the working tree differed from it (the figures belong to that code; the
    benchmark's own outputs do not count)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no", "--",
                                                          ".", ":!benchmarks/results.*", ":!benchmarks/*.png")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    if not commit:
        return "unknown (not a git checkout)"
    return f"{commit} ({'dirty: uncommitted changes to tracked files' if dirty else 'clean tree'})"


def rate(items: int, seconds: float) -> float:
    return items / seconds if seconds > 0 else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def run_child(job: str, params: dict, timeout: float = 900) -> dict:
    """Run `benchmarks.child` job in a fresh Python process and return its JSON record (peak RSS included, and
    `process_s`: the process's wall time), so a measurement of memory never sees what another section allocated."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.child", job, json.dumps(params)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child '{job}' with {params} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "process_s": time.perf_counter() - start}  # the whole process, start-up included


def fmt(value, digits: int = 3) -> str:
    """Table cells: numbers with `digits` significant digits, everything else as text."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else ("yes" if value else "no")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)
