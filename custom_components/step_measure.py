"""One training step of a bundle's network, measured: the memory it takes, the seconds it runs and its FLOPs.

A plan chooses its patch and batch size from these measurements (:mod:`custom_components.planning`). Each step runs
in a fresh process forked from a server that imported torch once, so candidates do not see each other's memory and
cost a fraction of a second each beyond the step itself. Memory is the peak RSS on CPU, where torch has no peak
counter, and ``max_memory_reserved`` on CUDA; the time is the fastest of a few steps after the first one, which warms
the allocator and the kernels. The FLOPs of the network's forward and backward pass are counted by torch's
``FlopCounterMode`` on a copy on the meta device: no compute, and the same count on every machine, however busy.
"""

from __future__ import annotations

import atexit
import copy
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from monai.bundle import ConfigParser

from custom_components.paths import REPO_ROOT

GIB = 2**30
# a step's time: the fastest of up to this many steps after the first, or of those run within TIMING_S seconds (a
# busy machine stalls single steps; the fastest is the step's own cost)
TIMED_STEPS = 3
TIMING_S = 1.0


class MeasureError(ValueError):
    """A training step could not be measured; the message says why."""


def gib(size: float) -> str:
    """Bytes as GiB, for messages and plan files."""
    return f"{size / GIB:.2f} GiB"


def bundle_parser(config_file: str | Path, overrides: dict[str, Any]) -> ConfigParser:
    """The bundle's config with ``overrides`` set on top, as a plan's values are (``--plan_file``)."""
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.update({"bundle_root": str(Path(config_file).resolve().parents[1]), **overrides})
    return parser


def _step(network: Any, loss_function: Any, optimizer: Any, image: Any, label: Any, amp: bool) -> None:
    """Forward, loss, backward and optimiser step, as the trainer runs them."""
    import torch

    with torch.autocast(image.device.type, enabled=amp):
        loss = loss_function(network(image), label)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _step_flops(network: Any, image_shape: tuple[int, ...]) -> int:
    """FLOPs of the network's forward and backward pass on an input of ``image_shape`` (the loss and the optimiser
    are a rounding error beside the convolutions), counted on a copy on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    twin = copy.deepcopy(network).to("meta")
    with FlopCounterMode(display=False) as counter:
        twin(torch.empty(image_shape, device="meta")).sum().backward()
    return int(counter.get_total_flops())


def _step_cost(parser: ConfigParser, request: dict[str, Any]) -> dict[str, Any]:
    """Training steps of the bundle's network at the request's patch and batch size: ``{"bytes": n, "seconds": t,
    "flops": f}`` (the memory the first took, the fastest of the next ones, the FLOPs of one), ``{"bytes": None}`` when
    it ran out of memory, or ``{"error": text}``."""
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
        _step(network, loss_function, optimizer, image, label, amp)
        if device.type == "cuda":
            size = torch.cuda.max_memory_reserved(device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            size = peak - start
        times: list[float] = []
        while len(times) < TIMED_STEPS and sum(times) < TIMING_S:
            started = time.perf_counter()
            _step(network, loss_function, optimizer, image, label, amp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
        return {"bytes": size, "seconds": min(times), "flops": _step_flops(network, tuple(image.shape))}
    except (torch.cuda.OutOfMemoryError, MemoryError):
        return {"bytes": None}
    except RuntimeError as err:  # the CPU allocator's out-of-memory error is a plain RuntimeError
        return {"bytes": None} if "can't allocate memory" in str(err) else {"error": f"{type(err).__name__}: {err}"}
    except Exception as err:  # a config the bundle cannot build: reported to the user, not as a traceback
        return {"error": f"{type(err).__name__}: {err}"}


def serve() -> None:
    """``python -m custom_components.step_measure``: answer each JSON request line on stdin with a JSON line.

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
                os.write(write, json.dumps(_step_cost(parsers[key], request)).encode())
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
            command = [sys.executable, "-m", "custom_components.step_measure"]
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
            raise MeasureError(f"the process measuring training steps ended: {' '.join(errors)}")
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
    out of memory; each pair is measured once, in its own process (see ``serve``), and its step time and FLOPs are
    kept in ``seconds`` and ``flops``."""

    config_file: Path
    overrides: dict[str, Any]
    device: str = "cpu"
    log: Callable[[str], None] = print
    measured: dict[tuple[tuple[int, ...], int], int | None] = field(default_factory=dict)
    seconds: dict[tuple[tuple[int, ...], int], float] = field(default_factory=dict)
    flops: dict[tuple[tuple[int, ...], int], int] = field(default_factory=dict)

    def __call__(self, patch: tuple[int, ...], batch: int) -> int | None:
        if (patch, batch) not in self.measured:
            self.measured[patch, batch] = self._measure(patch, batch)
        return self.measured[patch, batch]

    def step_seconds(self, patch: tuple[int, ...], batch: int) -> float:
        """Seconds of one training step (measured with its memory); infinite when it ran out of memory."""
        self(patch, batch)
        return self.seconds.get((patch, batch), float("inf"))

    def step_gflop(self, patch: tuple[int, ...], batch: int) -> float:
        """GFLOP of one training step's forward and backward pass (counted with its memory); infinite when it ran
        out of memory."""
        self(patch, batch)
        return self.flops[patch, batch] / 1e9 if (patch, batch) in self.flops else float("inf")

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
            raise MeasureError(f"the network of {self.config_file} cannot run a training step ({answer['error']})")
        if answer["bytes"] is None:
            size = "out of memory"
        else:
            self.seconds[patch, batch], self.flops[patch, batch] = answer["seconds"], answer["flops"]
            size = f"{gib(answer['bytes'])}, {answer['flops'] / 1e9:.1f} GFLOP, {answer['seconds']:.2f} s a step"
        self.log(f"  patch {list(patch)} batch {batch}: {size} ({time.perf_counter() - started:.1f} s)")
        return answer["bytes"]


if __name__ == "__main__":
    serve()
