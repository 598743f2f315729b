"""The replicated state: what must be bit-identical on every member, flattened for transfer.

Objects with `state_dict()` / `load_state_dict()` (modules, optimizers, LR schedulers, the
`TorchRNG` helper below) or plain dicts are registered by name. A state is flattened into
a JSON-able skeleton plus a list of tensors; tensors travel as raw bytes over the process
group, the skeleton as JSON. Nothing is pickled. Dict keys keep their type (optimizer state is
keyed by int), tuples stay tuples, so `load_state_dict` sees what `state_dict` produced.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
)}


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor of the flattened state lives and what it is."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    device_type: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=_DTYPES[self.dtype]).element_size()

    def to_json(self) -> list[Any]:
        return [self.path, self.dtype, list(self.shape), self.device_type]

    @classmethod
    def from_json(cls, item: list[Any]) -> TensorSpec:
        path, dtype, shape, device_type = item
        if dtype not in _DTYPES:
            raise ValueError(f"state tensor {path!r} has unsupported dtype {dtype!r}")
        return cls(str(path), dtype, tuple(int(s) for s in shape), str(device_type))


def flatten(value: Any, path: str, tensors: list[torch.Tensor], specs: list[TensorSpec]) -> Any:
    """Replace tensors by {"__tensor__": i}; encode dicts (with key types) and tuples."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise TypeError(f"state tensor at {path!r} has unsupported dtype {value.dtype}")
        specs.append(TensorSpec(path, dtype, tuple(value.shape), value.device.type))
        # The tensor object itself where that is safe (healing may receive into it and, if the
        # transfer is abandoned, re-point it); a detached alias for tensors that track grads.
        tensors.append(value.detach() if value.requires_grad else value)
        return {"__tensor__": len(tensors) - 1}
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise TypeError(f"state dict key {key!r} at {path!r} is not a str or int")
            items.append([key, flatten(item, f"{path}.{key}", tensors, specs)])
        return {"__dict__": items}
    if isinstance(value, tuple):  # includes torch.Size
        return {"__tuple__": [flatten(v, f"{path}[{i}]", tensors, specs) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [flatten(v, f"{path}[{i}]", tensors, specs) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(
        f"state at {path!r} has a value of type {type(value).__name__} that cannot be replicated "
        "(supported: tensors, dicts, lists, tuples, numbers, strings, None)"
    )


def unflatten(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {key: unflatten(item, tensors) for key, item in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        raise ValueError(f"malformed state skeleton node {sorted(skeleton)}")
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


class _PlainDict:
    """Adapter so a plain dict can be registered: its values are replaced in place on load."""

    def __init__(self, target: dict[str, Any]) -> None:
        self.target = target

    def state_dict(self) -> dict[str, Any]:
        return dict(self.target)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target.clear()
        self.target.update(state)


class TorchRNG:
    """Registers torch's global CPU RNG as replicated state (e.g. for identical dropout masks)."""

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"].to(torch.uint8).cpu())


@dataclass
class Snapshot:
    skeleton: dict[str, Any]
    tensors: list[torch.Tensor]
    specs: list[TensorSpec]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


class ReplicatedState:
    """The named objects whose state every member must hold bit-identically."""

    def __init__(self) -> None:
        self._objects: dict[str, Any] = {}

    def register(self, name: str, obj: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("state name must be a non-empty string")
        if isinstance(obj, dict) and not hasattr(obj, "state_dict"):
            obj = _PlainDict(obj)
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(
                f"state {name!r} ({type(obj).__name__}) needs state_dict() and load_state_dict()"
            )
        self._objects[name] = obj

    def register_all(self, state: Any) -> None:
        """`Manager(state=...)`: one object, or a dict of named objects."""
        if isinstance(state, dict) and all(
            hasattr(v, "state_dict") or isinstance(v, dict) for v in state.values()
        ) and state and all(isinstance(k, str) for k in state):
            for name, obj in state.items():
                self.register(name, obj)
        else:
            self.register("state", state)

    def __len__(self) -> int:
        return len(self._objects)

    def names(self) -> list[str]:
        return list(self._objects)

    def snapshot(self) -> Snapshot:
        tensors: list[torch.Tensor] = []
        specs: list[TensorSpec] = []
        skeleton = {
            name: flatten(obj.state_dict(), name, tensors, specs) for name, obj in self._objects.items()
        }
        return Snapshot(skeleton, tensors, specs)

    def load(self, skeleton: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        if sorted(skeleton) != sorted(self._objects):
            raise ValueError(
                f"replicated state names differ: this worker registered {sorted(self._objects)}, "
                f"the source has {sorted(skeleton)}"
            )
        for name, obj in self._objects.items():
            obj.load_state_dict(unflatten(skeleton[name], tensors))

    def digest(self) -> tuple[str, list[str], list[str]]:
        """(overall digest, per-tensor digests, tensor paths) of the current state."""
        return digest_snapshot(self.snapshot())


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (CPU, contiguous) without copying when possible."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy())


def digest_snapshot(snapshot: Snapshot) -> tuple[str, list[str], list[str]]:
    overall = hashlib.blake2b(digest_size=16)
    overall.update(json.dumps(snapshot.skeleton, sort_keys=True, default=str).encode())
    per_tensor = []
    for spec, tensor in zip(snapshot.specs, snapshot.tensors):
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{spec.dtype}{list(spec.shape)}".encode())
        h.update(tensor_bytes(tensor))
        per_tensor.append(h.hexdigest())
        overall.update(h.digest())
    return overall.hexdigest(), per_tensor, [s.path for s in snapshot.specs]


def iter_nonempty(specs: list[TensorSpec]) -> Iterator[tuple[int, TensorSpec]]:
    for i, spec in enumerate(specs):
        if spec.nbytes:
            yield i, spec
