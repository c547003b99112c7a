"""Pickles that name foreign globals (torch's, TE's) without importing them.

A ``.pt`` file's ``data.pkl`` refers to classes and functions by module path
(``torch._utils._rebuild_tensor_v2``, ``torch.BFloat16Storage``, TE's FP8 tensor rebuild).
Python's picklers import a global's module to check it before writing its name; this one
writes :class:`Global` stand-ins by their path alone, so neither torch nor TE has to be
importable (or imported: a conversion that only moves bytes never loads torch).
"""
from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any


class Global:
    """A callable or class written into the pickle as the global ``path``; never called here."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # picklers require the reduce function to be callable
        raise TypeError(f"{self.path} is a stand-in for a foreign global; it is only pickled")

    def __repr__(self) -> str:
        return f"<global {self.path}>"


class InstanceValue:
    """An instance of a foreign class, pickled as ``object.__reduce_ex__(2)`` pickles a plain
    instance: NEWOBJ of the class, then BUILD with its state."""

    def __init__(self, cls: Global, state: Any):
        self.cls = cls
        self.state = state


if TYPE_CHECKING:
    class _PurePickler(pickle._Pickler):
        """The internals of the pure-Python pickler that typeshed leaves undeclared."""

        memo: dict[int, tuple[int, Any]]
        proto: int
        write: Callable[[bytes], Any]  # the file's write, set by __init__

        def memoize(self, obj: Any) -> None: ...
        def get(self, i: int) -> bytes: ...
        def save(self, obj: Any, save_persistent_id: bool = True) -> None: ...
else:
    _PurePickler = pickle._Pickler


class StandInPickler(_PurePickler):
    """The pure-Python pickler (``data.pkl`` holds only structure, so its speed does not matter)
    with :class:`Global` and :class:`InstanceValue` written as above. Its output is byte for byte
    what the C pickler writes for the real objects (both memoize a global once and reference it)."""

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, Global):
            self._write_global(obj)
        elif isinstance(obj, InstanceValue):
            self._write_global(obj.cls)
            self.save(())
            self.write(pickle.NEWOBJ)
            self.memoize(obj)
            self.save(obj.state)
            self.write(pickle.BUILD)
        else:
            super().save(obj, save_persistent_id)

    def _write_global(self, obj: Global) -> None:
        memo = self.memo.get(id(obj))
        if memo is not None:
            self.write(self.get(memo[0]))
            return
        module, name = obj.path.rsplit(".", 1)
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def dumps(obj: Any, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    StandInPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()
