# Copyright 2026 The hf-mla-vlm Authors. Apache-2.0.
"""Bounded-memory pieces of a conversion: lazy source weights, empty models, a header-first sharded writer, host /
disk caches and the memory budget (`--max-memory`, `--offload-folder`, in the style of accelerate).

`convert` never loads the source model whole. It builds the source and the MLA model with their parameters on the
meta device (`empty_model`: buffers such as the rotary tables stay real), reads tensors from the source's safetensors
shards when a step needs them ([`SourceCheckpoint`]: each shard opened for one group of tensors and closed again, so
no mapping of a whole shard stays resident), and writes the output shard by shard as each decoder layer is converted
([`ShardedSafetensorsWriter`]: the shard plan and every header are known up front from the meta model, so a tensor
goes to disk as soon as it exists and nothing is buffered). This is llm-compressor's sequential pipeline (one layer
resident, the rest on disk) applied to the weights as well as to calibration.
"""

import json
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.initialization import no_init_weights
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..errors import InputError


DEFAULT_MAX_SHARD_SIZE = "5GB"  # `save_pretrained`'s default

# On-disk prefix -> in-memory prefix: the pre-v5 layouts the supported VLMs are published in (Transformers 5 renames
# them on load; `convert` reads the shards itself, so it renames them here). Tried in order, only when the name is
# not an in-memory name already; every mapping is checked to hit a parameter of the model exactly once.
LEGACY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "model.language_model."),  # LLaVA family
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
    ("visual.", "model.visual."),  # Qwen2-VL / Qwen2.5-VL
    ("model.", "model.language_model."),
)

_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


# --- sizes and budgets -----------------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """Bytes of `size`: an int, or a string such as `"8GiB"`, `"500MB"`, `"1.5GB"`, `"1024"` (accelerate's units:
    KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB powers of 2).

    Raises:
        `InputError`: not a size, or not positive."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        if match is None or match.group(2).lower() not in _UNITS:
            raise InputError(f"{size!r} is not a size; write e.g. 8GiB, 500MB or a number of bytes.")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise InputError(f"A size must be positive, got {size!r}.")
    return value


def parse_max_memory(max_memory: str | Mapping[str, int | str] | None) -> dict[str, int]:
    """`--max-memory` as `{device: bytes}`: a mapping (`{"cpu": "8GiB", "cuda:0": "70GiB"}`, accelerate's
    `max_memory`) or the same as one string, `"cpu=8GiB,cuda:0=70GiB"`. `cuda` alone means `cuda:0`. None -> `{}`.

    Raises:
        `InputError`: an entry that is not `device=size`, an unknown device name, or a bad size."""
    if max_memory is None:
        return {}
    if isinstance(max_memory, str):
        entries = {}
        for item in filter(None, (part.strip() for part in max_memory.split(","))):
            device, sep, size = item.partition("=")
            if not sep:
                raise InputError(f"--max-memory entry {item!r} is not DEVICE=SIZE (e.g. cpu=8GiB,cuda:0=70GiB).")
            entries[device.strip()] = size.strip()
        max_memory = entries
    budget = {}
    for device, size in max_memory.items():
        name = str(device).strip().lower()
        name = "cuda:0" if name == "cuda" else name
        if name != "cpu" and not re.fullmatch(r"cuda:\d+", name):
            raise InputError(f"--max-memory device {device!r} must be cpu or cuda:N.")
        budget[name] = parse_size(size)
    return budget


def device_key(device: torch.device) -> str:
    """The `max_memory` key of `device` (`cpu`, `cuda:N`)."""
    return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count * (torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits) // 8


# --- empty models ----------------------------------------------------------------------------------------------------
@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every parameter registered in the block on the meta device; buffers stay real (accelerate's
    `init_empty_weights(include_buffers=False)`): the rotary tables of a model built here are usable."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            kept = module._parameters[name]
            module._parameters[name] = type(kept)(kept.to("meta"), requires_grad=kept.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_model(model_class: type, config) -> torch.nn.Module:
    """`model_class(config)` in eval mode with its parameters on the meta device (no memory, no initialisation) and
    its buffers real; fill it with [`SourceCheckpoint.load_into`]."""
    with no_init_weights(), parameters_on_meta():
        model = model_class(config)
    model.tie_weights()  # a tied LM head shares the embedding's parameter (checkpoints store it once)
    return model.eval()


def weight_names(model: torch.nn.Module) -> tuple[list[str], dict[str, str]]:
    """The state-dict names a checkpoint of `model` holds (tied duplicates left out, as `save_pretrained` does) and
    the tied duplicates, each mapped to the name it shares a parameter with."""
    first, tied = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return [name for name in model.state_dict() if name not in tied], tied


def set_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the parameter or buffer `name` (as a frozen parameter for a parameter)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def release(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Put the parameters `names` back on the meta device (frees their memory)."""
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(module._parameters[leaf].to("meta"), requires_grad=False)


# --- lazy source weights ---------------------------------------------------------------------------------------------
class SourceCheckpoint:
    """The safetensors weights of a checkpoint folder, read on demand under the model's in-memory names.

    Only the index (or the single file's header) is read when opening; [`read`] opens the shards holding the asked
    tensors, copies them out and closes the shards again. `tensors_read` / `bytes_read` count what was read and
    `max_resident_bytes` the largest group read at once (the tests' memory bound).

    Raises:
        `InputError`: the folder has no safetensors weights (e.g. only `pytorch_model.bin`: re-save it with
            `save_pretrained(..., safe_serialization=True)` first), or its index names missing shards.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SAFE_WEIGHTS_NAME).is_file():
            with safe_open(str(self.folder / SAFE_WEIGHTS_NAME), framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), SAFE_WEIGHTS_NAME)
        else:
            raise InputError(
                f"{self.folder} has no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}: conversion streams "
                "safetensors weights only. Re-save the checkpoint with save_pretrained(..., safe_serialization=True)."
            )
        missing = sorted({shard for shard in weight_map.values() if not (self.folder / shard).is_file()})
        if missing:
            raise InputError(f"{self.folder}: the weight index names shards that are missing: {missing}.")
        self.disk_map: dict[str, str] = weight_map  # on-disk name -> shard file
        self.names: dict[str, str] = {}  # in-memory name -> on-disk name, after `bind`
        self.tensors_read = 0
        self.bytes_read = 0
        self.max_resident_bytes = 0

    def bind(self, model: torch.nn.Module) -> "SourceCheckpoint":
        """Map the on-disk names to the in-memory names of `model` (an [`empty_model`] of the source class), checking
        that every weight of the model is found exactly once (tied duplicates may be absent)."""
        required, tied = weight_names(model)
        expected = set(required) | set(tied)
        names, unknown = {}, []
        for disk_name in self.disk_map:
            name = memory_name(disk_name, expected)
            if name is None:
                unknown.append(disk_name)
            elif name in names:
                raise InputError(f"{self.folder}: {names[name]!r} and {disk_name!r} both hold the weight {name!r}.")
            else:
                names[name] = disk_name
        missing = [name for name in required if name not in names]
        if missing or unknown:
            raise InputError(
                f"{self.folder}: the checkpoint's weights do not match {type(model).__name__}: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unknown)} unknown (e.g. {unknown[:3]})."
            )
        self.names = {name: disk for name, disk in names.items() if name not in tied}
        return self

    def read(
        self, names: Iterable[str], dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The tensors `names` (in-memory names), floating ones cast to `dtype` when given, on `device`."""
        names = list(names)
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.disk_map[self.names[name]], []).append(name)
        out, resident = {}, 0
        for shard, group in by_shard.items():
            for name in group:
                # One handle per tensor: the shard pages a handle has read stay mapped, and count in the process's
                # RSS beside their float32 copies, until it closes (benchmarks/results/conversion_scale.md).
                with safe_open(str(self.folder / shard), framework="pt") as handle:
                    tensor = handle.get_tensor(self.names[name])
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                out[name] = tensor.to(device)
                resident += tensor.numel() * tensor.element_size()
        self.tensors_read += len(names)
        self.bytes_read += resident
        self.max_resident_bytes = max(self.max_resident_bytes, resident)
        return {name: out[name] for name in names}

    def load_into(
        self, model: torch.nn.Module, names: Iterable[str], dtype: torch.dtype | None, device: torch.device | str
    ) -> None:
        """Materialise the weights `names` of `model` (an [`empty_model`] bound here) on `device` ([`release`] puts
        them back on the meta device)."""
        for name, tensor in self.read(names, dtype, device).items():
            set_tensor(model, name, tensor)


def memory_name(disk_name: str, expected: set[str]) -> str | None:
    """The in-memory name of the on-disk weight `disk_name` among `expected`, through [`LEGACY_PREFIXES`]."""
    if disk_name in expected:
        return disk_name
    for old, new in LEGACY_PREFIXES:
        if disk_name.startswith(old) and (candidate := new + disk_name[len(old) :]) in expected:
            return candidate
    return None


# --- sharded output --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.dtype)


def plan_of(model: torch.nn.Module, order: Sequence[str], dtype: torch.dtype | None = None) -> list[PlannedTensor]:
    """The tensors `order` of an (empty) model, with their shapes and dtypes (floating ones as `dtype` when given), in
    writing order."""
    state = model.state_dict()
    planned = []
    for name in order:
        tensor = state[name]
        planned.append(
            PlannedTensor(name, tuple(tensor.shape), dtype if dtype and tensor.is_floating_point() else tensor.dtype)
        )
    return planned


def stage_memory(
    source_model: torch.nn.Module,
    mla_model: torch.nn.Module,
    text_layers: str,
    *,
    source_dtype: torch.dtype,
    target_dtype: torch.dtype,
    calibrated: bool,
    calibration_tokens: int = 0,
) -> dict[str, int]:
    """Bytes each stage of a streamed conversion holds at its peak, from the shapes of two empty models (the source
    and the MLA model, [`empty_model`]); what `convert` checks `--max-memory` against before reading a weight.

    The model of the code: `capture` holds every weight before the first decoder layer in float32 (the LM head is
    never read); `calibration_layer` one decoder layer in float32 and five `d x d` float64 statistics;
    `convert_head` one non-decoder tensor as read and as written; `convert_layer` one source layer as read, its
    attention in float32 twice (source and stage-1 copies), the converted layer as written, and for an
    activation-aware SVD two `d x d` covariances plus four `d x d` float64 work matrices of the eigendecomposition.
    `hidden_states` is the float32 hidden states of all calibration tokens, kept between layers on the host (or
    offloaded). Python, Torch and the tokenizer come on top (measured: see benchmarks/conversion_scale.py)."""
    prefix = f"{text_layers}."
    names, _ = weight_names(source_model)
    shapes = {name: tuple(t.shape) for name, t in source_model.state_dict().items()}
    hidden = source_model.config.text_config.hidden_size
    layer_sizes: dict[str, int] = {}
    head_sizes = []
    for name in names:
        if name.startswith(prefix):
            layer = name[: len(prefix) + name[len(prefix) :].index(".")]
            layer_sizes[layer] = layer_sizes.get(layer, 0) + tensor_bytes(shapes[name], torch.float32)
        elif not name.startswith("lm_head."):
            head_sizes.append(tensor_bytes(shapes[name], torch.float32))
    attention = max(
        sum(tensor_bytes(shapes[n], torch.float32) for n in names if n.startswith(layer + ".self_attn."))
        for layer in layer_sizes
    )
    mla_names, _ = weight_names(mla_model)
    mla_shapes = {name: tuple(t.shape) for name, t in mla_model.state_dict().items()}
    mla_layer = max(
        sum(tensor_bytes(mla_shapes[n], target_dtype) for n in mla_names if n.startswith(layer + "."))
        for layer in layer_sizes
    )
    largest_layer = max(layer_sizes.values())
    hidden_states = calibration_tokens * hidden * 4
    square = hidden * hidden * 8
    scale = tensor_bytes((1,), source_dtype) / 4
    largest_head = max(head_sizes) if head_sizes else 0
    stages = {
        "convert_head": int(largest_head * scale + largest_head * tensor_bytes((1,), target_dtype) / 4),
        "convert_layer": int(largest_layer * scale + 2 * attention + mla_layer + (6 * square if calibrated else 0)),
    }
    if calibrated:
        stages["capture"] = sum(head_sizes)
        stages["calibration_layer"] = largest_layer + 5 * square
        stages["hidden_states"] = hidden_states
    return stages


def split_shards(plan: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive shards of at most `max_shard_bytes` each (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for item in plan:
        if current and size + item.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.nbytes
    return shards + [current] if current else shards


class ShardedSafetensorsWriter:
    """Writes `plan` as safetensors shards in `folder`, tensor by tensor, in plan order, buffering nothing.

    Each shard's header (names, dtypes, shapes, offsets) is computed from the plan and written when the shard is
    opened; [`write`] then appends the tensor's bytes. File names follow `save_pretrained`: `model.safetensors` for one
    shard, else `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` (written by [`close`], which
    also checks that every planned tensor was written). Use it inside a staging folder (`utils.staged_folder`)."""

    def __init__(self, folder: str | os.PathLike, plan: Sequence[PlannedTensor], max_shard_size: int | str):
        self.folder = Path(folder)
        self.shards = split_shards(plan, parse_size(max_shard_size))
        count = len(self.shards)
        self.files = [
            SAFE_WEIGHTS_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        self._queue = [(i, item) for i, shard in enumerate(self.shards) for item in shard]
        self._next = 0
        self._handle, self._open_shard = None, None

    def _header(self, shard: list[PlannedTensor]) -> bytes:
        header, offset = {}, 0
        for item in shard:
            end = offset + item.nbytes
            header[item.name] = {
                "dtype": _DTYPE_CODES[item.dtype],
                "shape": list(item.shape),
                "data_offsets": [offset, end],
            }
            offset += item.nbytes
        header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (its name, shape and dtype must match the plan)."""
        if self._next >= len(self._queue):
            raise RuntimeError(f"{name}: every planned tensor was written already.")
        shard_idx, item = self._queue[self._next]
        if name != item.name or tuple(tensor.shape) != item.shape or tensor.dtype != item.dtype:
            raise RuntimeError(
                f"Writing {name} {tuple(tensor.shape)} {tensor.dtype}, but the plan's next tensor is {item.name} "
                f"{item.shape} {item.dtype}."
            )
        if self._open_shard != shard_idx:
            self._close_shard()
            self._handle = open(self.folder / self.files[shard_idx], "wb")
            self._handle.write(self._header(self.shards[shard_idx]))
            self._open_shard = shard_idx
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def _close_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle, self._open_shard = None, None

    def close(self) -> list[str]:
        """Close the last shard, write the index (several shards) and return the files written."""
        self._close_shard()
        if self._next != len(self._queue):
            left = [item.name for _, item in self._queue[self._next :]]
            raise RuntimeError(f"{len(left)} planned tensors were not written (e.g. {left[:3]}).")
        if len(self.files) == 1:
            return list(self.files)
        index = {
            "metadata": {"total_size": sum(item.nbytes for shard in self.shards for item in shard)},
            "weight_map": {item.name: self.files[i] for i, shard in enumerate(self.shards) for item in shard},
        }
        (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [*self.files, SAFE_WEIGHTS_INDEX_NAME]

    def abort(self) -> None:
        self._close_shard()


# --- calibration intermediates ---------------------------------------------------------------------------------------
class IntermediatesCache:
    """The hidden states between two decoder layers, one tensor per calibration sample, on the host up to
    `host_budget` bytes and in `offload_folder` (one safetensors file per sample) beyond it.

    Raises:
        `InputError` (from [`put`]): the host budget is exceeded and no offload folder was given."""

    def __init__(self, host_budget: int | None = None, offload_folder: str | os.PathLike | None = None):
        self.host_budget = host_budget
        self.offload_folder = Path(offload_folder) if offload_folder is not None else None
        self._host: dict[int, torch.Tensor] = {}
        self._disk: set[int] = set()
        self.host_bytes = 0
        self.offloaded = 0

    def put(self, index: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu")
        self._drop(index)
        size = tensor.numel() * tensor.element_size()
        if self.host_budget is None or self.host_bytes + size <= self.host_budget:
            self._host[index] = tensor
            self.host_bytes += size
            return
        if self.offload_folder is None:
            raise InputError(
                f"The calibration hidden states exceed the host budget of {self.host_budget / 2**30:.2f} GiB "
                "(--max-memory cpu=...): pass --offload-folder to keep the rest on disk, fewer samples, or a larger "
                "budget."
            )
        self.offload_folder.mkdir(parents=True, exist_ok=True)
        save_file({"hidden": tensor.contiguous()}, str(self._path(index)))
        self._disk.add(index)
        self.offloaded += 1

    def get(self, index: int) -> torch.Tensor:
        if index in self._host:
            return self._host[index]
        return load_file(str(self._path(index)))["hidden"]

    def _path(self, index: int) -> Path:
        return self.offload_folder / f"hidden-{index:06d}.safetensors"

    def _drop(self, index: int) -> None:
        if index in self._host:
            tensor = self._host.pop(index)
            self.host_bytes -= tensor.numel() * tensor.element_size()
        if index in self._disk:
            self._path(index).unlink(missing_ok=True)
            self._disk.discard(index)

    def clear(self) -> None:
        for index in list(self._host) + list(self._disk):
            self._drop(index)


class SpilledTensors(Mapping):
    """A read-only `{key: tensor}` view of one safetensors file: each access reads that tensor (and nothing is kept),
    so a layer's covariances cost memory only while a step uses one."""

    def __init__(self, path: str | os.PathLike, keys: Sequence[str], prefix: str = ""):
        self.path, self._keys, self.prefix = Path(path), list(keys), prefix

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(self.prefix + key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "LEGACY_PREFIXES",
    "IntermediatesCache",
    "PlannedTensor",
    "ShardedSafetensorsWriter",
    "SourceCheckpoint",
    "SpilledTensors",
    "device_key",
    "empty_model",
    "memory_name",
    "parameters_on_meta",
    "parse_max_memory",
    "parse_size",
    "plan_of",
    "release",
    "set_tensor",
    "split_shards",
    "stage_memory",
    "tensor_bytes",
    "weight_names",
]
