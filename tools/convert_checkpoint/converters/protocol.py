"""The Converter protocol: rewrite a checkpoint's tensors without a model definition.

It is compressed-tensors' protocol (``compressed_tensors.entrypoints.convert.Converter``), so the
library's converters plug in unchanged, and so does any object with these methods:

* ``get_dependencies(name) -> set[str]``: tensors that must be loaded with ``name`` (its scales,
  zero points ...), wherever they are stored;
* ``process(tensors) -> tensors``: the converted tensors of one group (a tensor and its
  dependencies, transitively);
* ``validate(tensors) -> tensors`` (optional): checks on meta tensors, returning what ``process``
  would produce (names, dtypes and shapes); without it ``process`` runs on meta tensors;
* ``update_config(config) -> config`` (compressed-tensors 0.20) or ``create_config()`` (the older
  spelling): the new ``quantization_config``, or None to remove it;
* ``update_model_config(config_dict) -> config_dict`` (optional): other config.json fields.

``ConverterChain`` applies several in order and turns their failures into one error line that
names the converter and the tensor.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
else:
    from ..torch_import import torch

from ..errors import ConversionError

Tensors = dict[str, torch.Tensor]


class Converter(Protocol):
    def get_dependencies(self, weight_name: str) -> set[str]: ...

    def process(self, tensors: Tensors) -> Tensors: ...


def check_converter(obj: Any, label: str) -> None:
    """Refuse an object that lacks the protocol's methods (one line naming what is missing)."""
    missing = [m for m in ("process", "get_dependencies") if not callable(getattr(obj, m, None))]
    if not (callable(getattr(obj, "update_config", None)) or callable(getattr(obj, "create_config", None))):
        missing.append("update_config or create_config")
    if missing:
        raise ConversionError(f"converter {label} ({type(obj).__name__}) is not a Converter: it has no {', '.join(missing)}")


def converter_label(obj: Any) -> str:
    """How a converter object is named in messages, the manifest and the report."""
    return getattr(obj, "label", None) or f"{type(obj).__module__}.{type(obj).__qualname__}"


@dataclass(frozen=True)
class ConverterChain:
    converters: tuple[Any, ...]
    labels: tuple[str, ...]

    @classmethod
    def of(cls, converters: Iterable[Any], labels: Iterable[str] | None = None) -> ConverterChain:
        converters = tuple(converters)
        labels = tuple(labels) if labels is not None else tuple(converter_label(c) for c in converters)
        if not converters:
            raise ConversionError("no converter given")
        for c, label in zip(converters, labels):
            check_converter(c, label)
        return cls(converters, labels)

    def dependencies(self, name: str) -> set[str]:
        """Every tensor ``name`` needs, through every converter, transitively."""
        found: set[str] = set()
        todo = [name]
        while todo:
            current = todo.pop()
            for c, label in zip(self.converters, self.labels):
                try:
                    deps = c.get_dependencies(current)
                except Exception as e:  # a converter's own failure, reported as one line
                    raise ConversionError(f"converter {label}: get_dependencies({current}) failed: {_what(e)}") from None
                for dep in deps or ():
                    if dep == name:
                        raise ConversionError(f"converter {label}: tensor {name} depends on itself")
                    if dep not in found:
                        found.add(dep)
                        todo.append(dep)
        return found

    def validate(self, tensors: Tensors, where: str) -> Tensors:
        """What ``process`` will produce for this group (meta tensors in, meta tensors out)."""
        return self._run(tensors, where, _validate_step, "refuses")

    def process(self, tensors: Tensors, where: str) -> Tensors:
        return self._run(tensors, where, lambda c, t: c.process(t), "failed on")

    def _run(self, tensors: Tensors, where: str, step, verb: str) -> Tensors:
        for c, label in zip(self.converters, self.labels):
            try:
                out = step(c, dict(tensors))
            except ConversionError:
                raise
            except Exception as e:  # a converter's own failure, reported as one line
                raise ConversionError(f"converter {label} {verb} {where}: {_what(e)}") from None
            tensors = _checked_output(out, label, where)
        return tensors

    def quantization_config(self, existing: Mapping | None) -> dict | None:
        """The ``quantization_config`` after every converter, or None when the chain removes it.
        ``update_config`` receives a compressed-tensors ``QuantizationConfig`` (or None when the
        source's is in another format), as compressed-tensors' own pipeline passes it."""
        config: Any = dict(existing) if existing else None
        for c, label in zip(self.converters, self.labels):
            try:
                if callable(getattr(c, "update_config", None)):
                    config = c.update_config(_as_library_config(config))
                else:
                    config = c.create_config()
            except Exception as e:
                raise ConversionError(f"converter {label}: building quantization_config failed: {_what(e)}") from None
            config = _as_dict(config)
        return config

    def model_config(self, config: dict) -> dict:
        for c in self.converters:
            update = getattr(c, "update_model_config", None)
            if callable(update):
                config = update(dict(config))
        return config

    def hf_config(self, config: Mapping[str, Any]) -> dict:
        """config.json after the chain: its ``quantization_config`` (removed when the chain
        leaves none) and the converters' model-config changes."""
        out = dict(config)
        qc = self.quantization_config(out.get("quantization_config"))
        if qc is None:
            out.pop("quantization_config", None)
        else:
            out["quantization_config"] = qc
        return self.model_config(out)


def _validate_step(converter: Any, tensors: Tensors) -> Any:
    validate = getattr(converter, "validate", None)
    out = validate(dict(tensors)) if callable(validate) else None
    if out is None:  # older converters only check: run process on the meta tensors
        out = converter.process(tensors)
    return out


def _what(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _checked_output(out: Any, label: str, where: str) -> Tensors:
    if not isinstance(out, Mapping):
        raise ConversionError(f"converter {label} returned {type(out).__name__} for {where}, not a dict of tensors")
    for name, t in out.items():
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f"converter {label} returned {type(t).__name__} for tensor {name}, not a tensor")
    return dict(out)


def _as_library_config(config: Any) -> Any:
    """A dict in compressed-tensors' format as the library's ``QuantizationConfig``; other
    formats (fp8, awq, modelopt ...) as None, which is what the library's converters expect."""
    if not isinstance(config, dict):
        return config
    if config.get("quant_method") != "compressed-tensors":
        return None
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return config
    data = {k: v for k, v in config.items() if k != "version"}
    try:
        return QuantizationConfig.model_validate(data)
    except Exception:
        return None


def _as_dict(config: Any) -> dict | None:
    if config is None:
        return None
    if isinstance(config, dict):
        return config
    dump = getattr(config, "model_dump", None)
    if not callable(dump):
        raise TypeError(f"a quantization config must be a dict or a pydantic model, got {type(config).__name__}")
    data = json.loads(json.dumps(dump(), default=_json_value))
    try:
        from compressed_tensors import __version__ as library_version

        data["version"] = library_version  # as compressed-tensors writes it
    except ImportError:
        pass
    return data


def _json_value(value: Any) -> Any:
    if hasattr(value, "value"):  # enums
        return value.value
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)
