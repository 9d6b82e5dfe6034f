"""A training plan from a dataset fingerprint, written as a config override file the bundles read.

Target spacing and intensity scheme follow nnU-Net's rules, and so do DynUNet's strides and kernels per axis
(``architecture: dynunet``); class weights come from the voxel share of each class.
Patch and batch size are chosen so that one training step (forward, loss, backward, optimiser step) of the
bundle's own network fits a memory budget: each candidate is measured, never only estimated. A measurement runs
in a fresh process forked from a server that imported torch once (peak RSS on CPU, where torch has no peak
counter; ``max_memory_reserved`` on CUDA), so candidates do not see each other's memory and cost a fraction
of a second each beyond the step itself.
"""

from __future__ import annotations

import atexit
import importlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml
from monai.bundle import ConfigParser

from custom_components.data import check_datalist, first_image_dims, load_dataset_json
from custom_components.fingerprint import compute_fingerprint
from custom_components.networks import total_downsampling
from custom_components.paths import REPO_ROOT
from custom_components.run_files import atomic_write_bytes, atomic_write_json

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net: an axis is low-resolution when 3x coarser in spacing and 3x fewer voxels
ANISOTROPIC_PERCENTILE = 10  # nnU-Net: target spacing of that axis, so thin-slice cases keep their resolution
BATCH_DATASET_FRACTION = 0.05  # nnU-Net: one step sees at most 5% of the dataset's voxels
MIN_BATCH = 2
PATCH_SHRINK = 0.75  # each candidate cuts one axis of the previous one by a quarter
PREDICTION_SLACK = 1.25  # candidates predicted above this multiple of the budget are not measured
MACHINE_FRACTION = 0.8  # never run a candidate predicted above this share of the device's (free) memory
GIB = 2**30
PLANNED_KEYS = ("dataset_dir", "spacing", "intensity", "class_weights", "patch_size", "batch_size")
DYNUNET_PLANNED_KEYS = ("strides", "kernel_sizes")  # the plan decides them too for architecture dynunet
MIN_FEATURE_MAP = 4  # nnU-Net: an axis is pooled while at least twice this many voxels are left along it
MAX_POOLS = 5  # at most this many poolings along an axis, six levels (nnU-Net caps them by MIN_FEATURE_MAP alone)
COARSE_RATIO = 2.0  # nnU-Net: an axis this much coarser than the finest is neither pooled nor convolved across


class PlanError(ValueError):
    """No plan can be made as asked; the message says why and what to change."""


def _gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB"


def bundle_config(dim: int) -> Path:
    """The train.yaml of the 2D or 3D bundle, whose network, loss and optimiser the plan measures."""
    path = REPO_ROOT / f"bundles/unet{dim}d/configs/train.yaml"
    if not path.is_file():
        raise PlanError(f"{path} does not exist: plan with --dim 3, or add the {dim}D bundle first")
    return path


def bundle_parser(config_file: str | Path, overrides: dict[str, Any]) -> ConfigParser:
    """The bundle's config with ``overrides`` set on top, as a plan's values are (``--plan_file``)."""
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.update({"bundle_root": str(Path(config_file).resolve().parents[1]), **overrides})
    return parser


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Median spacing per axis, except for an anisotropic dataset (nnU-Net's rule).

    When the coarsest axis is over 3x coarser than the others and has over 3x fewer voxels, its target is the
    10th percentile of its spacings (but not finer than the other axes): resampling every case to the median
    slice thickness would throw away the resolution of the cases with thinner slices.
    """
    target = np.median(spacings, axis=0)
    sizes = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [axis for axis in range(len(target)) if axis != worst]
    if not others:
        return target
    if (
        target[worst] > ANISOTROPY_THRESHOLD * target[others].max()
        and sizes[worst] * ANISOTROPY_THRESHOLD < sizes[others].min()
    ):
        thin = float(np.percentile(spacings[:, worst], ANISOTROPIC_PERCENTILE))
        target[worst] = max(thin, float(target[others].max()))
    return target


def intensity_plan(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The ``intensity`` key: CT (one channel) is clipped to the foreground 0.5-99.5 percentiles and z-scored with
    the foreground mean and std (HU keep one meaning across cases); MR and any other modality get a per-image
    z-score, because their intensities have no absolute scale."""
    channels = fingerprint["intensity"]
    if len(channels) == 1 and str(channels["0"]["modality"]).upper() == "CT":
        stats = channels["0"]
        return {
            "scheme": "ct_zscore",
            "window": [round(stats["percentile_00_5"], 2), round(stats["percentile_99_5"], 2)],
            "mean": round(stats["mean"], 4),
            "std": round(stats["std"], 4),
        }
    return {"scheme": "zscore", "window": None, "mean": None, "std": None}


def class_weights(fractions: Sequence[float]) -> list[float]:
    """Loss weight per class, background first: the inverse square root of its voxel share, scaled to mean 1.

    Rare classes weigh more, without plain inverse frequency's extremes (a class of 0.1% of the voxels would weigh
    1000x the background). A class present in no case gets the largest weight of the others.
    """
    share = np.asarray(fractions, dtype=float)
    weights = np.zeros_like(share)
    present = share > 0
    weights[present] = 1.0 / np.sqrt(share[present])
    weights[~present] = weights.max()
    return [round(float(w), 4) for w in weights / weights.mean()]


def divisibility(strides: Sequence[int | Sequence[int]], dims: int) -> np.ndarray:
    """Per axis, the factor every patch size must be a multiple of (:func:`networks.total_downsampling`)."""
    return np.asarray(total_downsampling(strides, dims), dtype=int)


def pool_and_conv_props(
    spacing: Sequence[float], size: Sequence[float], min_feature_map: int = MIN_FEATURE_MAP, max_pools: int = MAX_POOLS
) -> tuple[list[list[int]], list[list[int]]]:
    """DynUNet's ``strides`` (after its first, stride-1, level) and ``kernel_sizes`` (one per level) for a patch of
    ``size`` voxels of ``spacing`` mm: nnU-Net's rule (nnunetv2 ``get_pool_and_conv_props``).

    Each level halves the axes whose spacing is under twice the finest one and that keep at least twice
    ``min_feature_map`` voxels (an axis alone only with three times that), at most ``max_pools`` times each; its
    kernel is 3 along the axes within twice the finest spacing and 1 along the axes still coarser (once 3, always
    3); the bottleneck's kernel is 3. So a thick-slice axis is convolved and pooled only once the in-plane
    resolution has come down to its spacing.
    """
    dims = len(spacing)
    current_spacing, current_size = [float(s) for s in spacing], [float(n) for n in size]
    pools, kernel = [0] * dims, [1] * dims
    strides: list[list[int]] = []
    kernels: list[list[int]] = []
    while True:
        fits = [axis for axis in range(dims) if current_size[axis] >= 2 * min_feature_map]
        if not fits:
            break
        finest = min(current_spacing[axis] for axis in fits)
        axes = [a for a in fits if current_spacing[a] / finest < COARSE_RATIO and pools[a] < max_pools]
        if not axes or (len(axes) == 1 and current_size[axes[0]] < 3 * min_feature_map):
            break
        finest_overall = min(current_spacing)
        kernel = [
            3 if k == 3 or sp / finest_overall < COARSE_RATIO else 1
            for k, sp in zip(kernel, current_spacing, strict=True)
        ]
        kernels.append(kernel)
        strides.append([2 if axis in axes else 1 for axis in range(dims)])
        for axis in axes:
            pools[axis] += 1
            current_spacing[axis] *= 2
            current_size[axis] = math.ceil(current_size[axis] / 2)
    return strides, [*kernels, [3] * dims]


def dynunet_plan(spacing: Sequence[float], size: Sequence[float], channels: Sequence[int]) -> dict[str, Any]:
    """The keys of a DynUNet for patches up to ``size`` voxels of ``spacing`` mm: ``strides`` and ``kernel_sizes``
    by nnU-Net's rule (an axis stride or kernel the same on every axis written as one int), ``channels`` doubling
    per level from the first of ``channels`` up to its last (the bundle's 32 ... 320: nnU-Net's)."""
    strides, kernels = pool_and_conv_props(spacing, size)
    if len(strides) < 2:
        raise PlanError(
            f"a patch of {[round(float(n), 1) for n in size]} voxels leaves room for {len(strides)} poolings, "
            "DynUNet needs 2 (three levels): plan for architecture unet, or a finer spacing"
        )

    def compact(values: Sequence[int]) -> int | list[int]:
        return values[0] if len(set(values)) == 1 else list(values)

    first, last = int(channels[0]), int(max(channels))
    return {
        "channels": [min(first * 2**level, last) for level in range(len(kernels))],
        "strides": [compact(stride) for stride in strides],
        "kernel_sizes": [compact(kernel) for kernel in kernels],
    }


def patch_candidates(
    median_size: Sequence[float], divisor: Sequence[int], largest_size: Sequence[float] | None = None
) -> list[tuple[int, ...]]:
    """Patch sizes from the median image size down to two divisors per axis, largest first.

    Every size is a multiple of the divisor, and at least twice it, so the lowest resolution of the network keeps
    two voxels per axis (instance norm needs more than one), but never over ``largest_size`` (the largest case)
    rounded up to the divisor: an axis the network divides by more than the data holds is padded by less than
    one divisor. The first is the median size rounded down; each next one cuts by a quarter the axis that is
    largest relative to the median (nnU-Net's order), so the patch keeps the shape of a typical image.
    """
    median = np.asarray(median_size, dtype=float)
    step = np.asarray(divisor, dtype=int)
    largest = median if largest_size is None else np.asarray(largest_size, dtype=float)
    ceiling = np.maximum(step, np.ceil(largest / step).astype(int) * step)
    smallest = np.minimum(2 * step, ceiling)
    patch = np.minimum(ceiling, np.maximum(smallest, (median // step).astype(int) * step))
    candidates = [tuple(int(n) for n in patch)]
    while np.any(patch > smallest):
        reducible = np.flatnonzero(patch > smallest)
        axis = reducible[np.argmax(patch[reducible] / median[reducible])]
        shrunk = int(patch[axis] * PATCH_SHRINK) // step[axis] * step[axis]
        patch[axis] = min(patch[axis] - step[axis], max(smallest[axis], shrunk))
        candidates.append(tuple(int(n) for n in patch))
    return candidates


def _step_memory(parser: ConfigParser, request: dict[str, Any]) -> dict[str, Any]:
    """One training step of the bundle's network at the request's patch and batch size: ``{"bytes": n}`` (the
    memory it took), ``{"bytes": None}`` when it ran out of memory, or ``{"error": text}``."""
    import torch

    try:
        device = torch.device(request["device"])
        parser.update({"patch_size": request["patch_size"], "batch_size": request["batch_size"]})
        amp = device.type == "cuda" and bool(parser.get_parsed_content("amp"))
        start = psutil.Process().memory_info().rss
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        network = parser.get_parsed_content("network")
        loss_function = parser.get_parsed_content("train#loss_function")
        optimizer = parser.get_parsed_content("train#optimizer")
        batch = request["batch_size"] * parser.get_parsed_content("num_samples")
        patch = request["patch_size"]
        image = torch.randn(batch, parser.get_parsed_content("network_in_channels"), *patch, device=device)
        label = torch.randint(0, request["overrides"]["num_classes"], (batch, 1, *patch), device=device)
        for parameter in network.parameters():  # the optimiser's state exists from the second step on
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_function(network(image), label)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            return {"bytes": torch.cuda.max_memory_reserved(device)}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"bytes": peak - start}
    except (torch.cuda.OutOfMemoryError, MemoryError):
        return {"bytes": None}
    except RuntimeError as err:  # the CPU allocator's out-of-memory error is a plain RuntimeError
        return {"bytes": None} if "can't allocate memory" in str(err) else {"error": f"{type(err).__name__}: {err}"}
    except Exception as err:  # a config the bundle cannot build: reported to the user, not as a traceback
        return {"error": f"{type(err).__name__}: {err}"}


def serve() -> None:
    """``python -m custom_components.planning``: answer each JSON request line on stdin with a JSON line.

    Each step runs in a child forked from this process, which imported torch but never ran it (fork-safe): the
    child starts without any other step's memory, and pays no import. The child prints to stderr only. The
    bundle's config is read here, once per network, so that a child only builds and runs the network.
    """
    importlib.import_module("torch._dynamo")  # the optimiser step imports it: once here, not in every child
    parsers: dict[str, ConfigParser] = {}
    for line in sys.stdin:
        request = json.loads(line)
        key = json.dumps([request["config_file"], request["overrides"], request["device"]], sort_keys=True)
        if key not in parsers:
            try:
                device = {"device": f"$torch.device('{request['device']}')"}
                parsers[key] = bundle_parser(request["config_file"], {**request["overrides"], **device})
                parsers[key].resolve_macro_and_relative_ids()  # reads the `%file#key` macros' files
            except Exception as err:  # a config that cannot be read: the answer says why
                print(json.dumps({"error": f"{type(err).__name__}: {err}"}), flush=True)
                continue
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, answer through the pipe, never return into the loop
            try:
                os.close(read)
                os.dup2(2, 1)
                os.write(write, json.dumps(_step_memory(parsers[key], request)).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            answer = pipe.read()
        _, status = os.waitpid(pid, 0)
        if not answer:  # killed: by the kernel for memory (SIGKILL), or crashed
            signal = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            answer = json.dumps({"bytes": None} if signal == 9 else {"error": f"the step died (status {status})"})
        print(answer, flush=True)


class _Server:
    """The ``serve`` process: started on first use, shared by every measurement of this Python process (its
    start, importing torch, is the slow part), stopped when the process exits."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.errors: Any = None

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request, return its answer; a server that died is reported with its last error lines."""
        if self.process is None or self.process.poll() is not None:
            command = [sys.executable, "-m", "custom_components.planning"]
            self.errors = tempfile.TemporaryFile()
            self.process = subprocess.Popen(
                command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True
            )
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.errors.seek(0)
            errors = self.errors.read().decode(errors="replace").strip().splitlines()[-3:]
            raise PlanError(f"the process measuring training steps ended: {' '.join(errors)}")
        return json.loads(line)

    def close(self) -> None:
        """Stop the process: it ends when its input does."""
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait()
            self.process = None


_SERVER = _Server()
atexit.register(_SERVER.close)


@dataclass
class StepMemory:
    """Memory (bytes) of one training step of the bundle's network for a patch and batch size, None when it runs
    out of memory; each pair is measured once, in its own process (see ``serve``)."""

    config_file: Path
    overrides: dict[str, Any]
    device: str = "cpu"
    log: Callable[[str], None] = print
    measured: dict[tuple[tuple[int, ...], int], int | None] = field(default_factory=dict)

    def __call__(self, patch: tuple[int, ...], batch: int) -> int | None:
        if (patch, batch) not in self.measured:
            self.measured[patch, batch] = self._measure(patch, batch)
        return self.measured[patch, batch]

    def _measure(self, patch: tuple[int, ...], batch: int) -> int | None:
        started = time.perf_counter()
        request = {
            "config_file": str(self.config_file),
            "overrides": self.overrides,
            "device": self.device,
            "patch_size": list(patch),
            "batch_size": batch,
        }
        answer = _SERVER.ask(request)
        if "error" in answer:
            raise PlanError(f"the network of {self.config_file} cannot run a training step ({answer['error']})")
        size = "out of memory" if answer["bytes"] is None else _gib(answer["bytes"])
        self.log(f"  patch {list(patch)} batch {batch}: {size} ({time.perf_counter() - started:.1f} s)")
        return answer["bytes"]


@dataclass(frozen=True)
class StepChoice:
    """The patch and batch size chosen, and the measured memory of their training step."""

    patch_size: tuple[int, ...]
    batch_size: int
    step_bytes: int


def choose_patch_and_batch(
    candidates: Sequence[tuple[int, ...]],
    budget: float,
    measure: Callable[[tuple[int, ...], int], int | None],
    max_batch: int,
    machine_limit: float = math.inf,
) -> StepChoice:
    """The largest patch (candidates run largest first) whose step fits ``budget`` at batch 2, then the largest
    batch up to ``max_batch`` that still fits; both measured.

    A line through two measured steps (the smallest candidate and one near the geometric middle, neither
    depending on the budget) predicts each candidate's memory, so that only candidates predicted within 25% of
    the budget, and within ``machine_limit``, are measured: a larger budget never gives a smaller patch.
    """
    smallest = candidates[-1]
    low = measure(smallest, MIN_BATCH)
    if low is None or low > budget:
        needed = "more memory than the machine has" if low is None else _gib(low)
        raise PlanError(
            f"the smallest patch {list(smallest)} at batch {MIN_BATCH} needs {needed}, over the {_gib(budget)} "
            "budget: raise --memory-gb, or make the network smaller (e.g. --set channels=[16,32,64,128])"
        )
    voxels = {patch: float(np.prod(patch)) for patch in candidates}
    middle = math.sqrt(voxels[smallest] * voxels[candidates[0]])
    # an upper bound (memory grows at most in proportion to the patch) keeps the second measurement safe
    safe = [p for p in candidates if low * voxels[p] / voxels[smallest] <= machine_limit] or [smallest]
    reference = min(safe, key=lambda patch: abs(math.log(voxels[patch] / middle)))
    high = measure(reference, MIN_BATCH) if reference != smallest else None
    slope = 0.0 if high is None else max(0.0, (high - low) / (voxels[reference] - voxels[smallest]))
    fixed = low - slope * voxels[smallest]

    def predicted(patch: tuple[int, ...], batch: int) -> float:
        return fixed + slope * voxels[patch] * batch / MIN_BATCH

    def fits(patch: tuple[int, ...], batch: int) -> bool:
        if predicted(patch, batch) > min(PREDICTION_SLACK * budget, machine_limit):
            return False
        size = measure(patch, batch)
        return size is not None and size <= budget

    patch = next((p for p in candidates if fits(p, MIN_BATCH)), smallest)  # the smallest fits: measured above
    fitting, failing = MIN_BATCH, max_batch + 1
    per_volume = slope * voxels[patch] / MIN_BATCH
    guess = MIN_BATCH + int((budget - measure(patch, MIN_BATCH)) // per_volume) if per_volume > 0 else max_batch
    batch = min(max(guess, MIN_BATCH + 1), max_batch)
    while fitting + 1 < failing:
        if fits(patch, batch):
            fitting = batch
        else:
            failing = batch
        batch = (fitting + failing) // 2
    step_bytes = measure(patch, fitting)
    assert step_bytes is not None  # fitting batches were measured
    return StepChoice(patch, fitting, step_bytes)


def _machine_limit(device: str) -> float:
    """Memory a measurement may use without endangering the machine: a share of free RAM or of the GPU."""
    if device.startswith("cuda"):
        import torch

        return MACHINE_FRACTION * torch.cuda.get_device_properties(torch.device(device)).total_memory
    return MACHINE_FRACTION * psutil.virtual_memory().available


def planned_keys(config_file: str | Path, overrides: Mapping[str, Any]) -> tuple[str, ...]:
    """The keys a plan decides (refused in ``--set``): DynUNet's strides and kernels too when the plan's
    architecture, the bundle's with ``overrides`` on top, is dynunet."""
    architecture = overrides.get("architecture", ConfigParser.load_config_file(str(config_file)).get("architecture"))
    return PLANNED_KEYS + (DYNUNET_PLANNED_KEYS if architecture == "dynunet" else ())


def make_plan(
    dataset_dir: str | Path,
    memory_gb: float = 8.0,
    dim: int = 3,
    device: str = "cpu",
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Path, dict[str, Any]]:
    """Check the dataset, write ``fingerprint.json`` and ``plan_{dim}d.yaml`` into it; return the plan's path and keys.

    ``overrides`` are bundle keys (e.g. a smaller ``channels``) applied when measuring and written into the plan,
    so the plan's patch and batch size hold for the network it names. For ``architecture`` dynunet (the bundle's,
    or ``overrides``') the plan also writes the network's strides, kernel sizes and channels (``dynunet_plan``).
    The patch never exceeds the largest case by a divisor of the network or more along any axis.
    """
    root = Path(dataset_dir).resolve()
    description = load_dataset_json(root)
    image_dims = first_image_dims(description, root)
    if dim == 3 and image_dims == 2:
        raise PlanError(f"{root} holds 2D images: plan for the 2D bundle with --dim 2")
    num_classes = len(description["labels"])
    datalist = check_datalist(description, root, num_classes, image_dims)
    log(f"fingerprinting {len(datalist)} cases")
    fingerprint = {"dataset_dir": str(root), **compute_fingerprint(description, datalist, image_dims)}
    atomic_write_json(fingerprint, root / "fingerprint.json")

    config_file = bundle_config(dim)
    user = dict(overrides or {})
    planned = sorted(set(user) & set(planned_keys(config_file, user)))
    if planned:
        raise PlanError(f"--set {', '.join(planned)}: the plan decides these; change them in the plan file instead")
    weights = class_weights([fingerprint["classes"][str(c)]["fraction"] for c in range(num_classes)])
    fixed = {"num_classes": num_classes, "in_channels": len(description["modality"]), "class_weights": weights}
    parser = bundle_parser(config_file, {**user, **fixed})
    architecture, num_samples = parser.get_parsed_content("architecture"), parser.get_parsed_content("num_samples")
    num_folds = parser.get_parsed_content("num_folds")
    slice_axis = parser.get_parsed_content("slice_axis") if dim == 2 and image_dims == 3 else None

    shapes = np.asarray([case["shape"] for case in fingerprint["cases"]], dtype=float)
    spacings = np.asarray([case["spacing"] for case in fingerprint["cases"]], dtype=float)
    target = target_spacing(spacings, shapes)
    if slice_axis is not None:
        target[slice_axis] = -1.0  # the 2D bundle keeps the native spacing across the slices
    resampled = shapes * spacings / np.where(target > 0, target, spacings)
    axes = [axis for axis in range(image_dims) if axis != slice_axis]
    median, largest = np.median(resampled, axis=0)[axes], resampled.max(axis=0)[axes]
    network: dict[str, Any] = {}  # the keys the plan decides for dynunet: its topology from spacing and median size
    if architecture == "dynunet":
        channels = parser.get_parsed_content("channels")
        network = {"architecture": architecture, **dynunet_plan(target[axes], median, channels)}
    strides = network.get("strides", parser.get_parsed_content("strides"))
    candidates = patch_candidates(median, divisibility(strides, dim), largest)
    train_cases = len(datalist) - len(datalist) // max(num_folds, 1)
    voxels_per_step = float(np.prod(candidates[0])) * num_samples
    max_batch = max(
        MIN_BATCH, min(train_cases, int(BATCH_DATASET_FRACTION * resampled.prod(axis=1).sum() / voxels_per_step))
    )

    budget, machine_limit = memory_gb * GIB, _machine_limit(device)
    network_of = config_file.relative_to(REPO_ROOT)
    log(f"measuring training steps on {device} against {_gib(budget)} (network of {network_of})")
    if budget > machine_limit:
        log(
            f"  the budget is over {MACHINE_FRACTION:.0%} of the free memory: "
            f"steps predicted over {_gib(machine_limit)} are not run"
        )
    measure = StepMemory(config_file, {**user, **network, **fixed}, device, log)
    choice = choose_patch_and_batch(candidates, budget, measure, max_batch, machine_limit)

    plan = {
        "dataset_dir": str(root),
        "spacing": [round(float(s), 4) for s in target],
        "intensity": intensity_plan(fingerprint),
        "class_weights": weights,
        "patch_size": list(choice.patch_size),
        "batch_size": choice.batch_size,
        **user,
        **network,
    }
    path = root / f"plan_{dim}d.yaml"
    atomic_write_bytes(path, _plan_text(plan, path, dim, device, budget, choice, measure.measured).encode())
    log(f"wrote {root / 'fingerprint.json'} and {path}")
    return path, plan


def _plan_text(
    plan: dict[str, Any],
    path: Path,
    dim: int,
    device: str,
    budget: float,
    choice: StepChoice,
    measured: dict[tuple[tuple[int, ...], int], int | None],
) -> str:
    """The plan as YAML, headed by how to use it and the measurements it rests on."""
    steps = "\n".join(
        f"#   patch {list(patch)} batch {batch}: {'out of memory' if size is None else _gib(size)}"
        for (patch, batch), size in sorted(measured.items(), key=lambda item: (-np.prod(item[0][0]), item[0][1]))
    )
    header = (
        f"# Training plan written by `python -m custom_components.prepare plan` (see docs/prepare.md), read as data:\n"
        f"# its values replace the bundle's defaults, keys set on the command line win:\n"
        f"#   python -m monai.bundle run training --config_file bundles/unet{dim}d/configs/train.yaml "
        f"--plan_file {path}\n"
        f"# A training step at patch {list(choice.patch_size)} and batch {choice.batch_size} took "
        f"{_gib(choice.step_bytes)} of the {_gib(budget)} budget on {device}. Steps measured:\n{steps}\n"
    )
    return header + yaml.safe_dump(plan, sort_keys=False, default_flow_style=None)


if __name__ == "__main__":
    serve()
