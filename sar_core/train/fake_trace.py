"""Run a model without its memory: fake tensors, live-byte tracking and FLOP counting.

Used by ``sar plan`` (:mod:`sar_core.train.plan`). Under :func:`fake_session` a model of
any size is built and stepped on a laptop: ``torch._subclasses.FakeTensorMode`` gives every
tensor a shape, dtype and device but no data. Model code also does small host-side
arithmetic on tensor values (schedules, masks, text lengths, drop-path rates,
``.tolist()``), which a fake tensor cannot answer, so :class:`FakeTrace` (a dispatch mode
above the fake mode) decides op by op:

* every input real and every output at most ``SMALL_BYTES``: the op runs for real (such
  tensors cost nothing; their values stay exact);
* otherwise the op runs fake; a real boolean mask indexing a fake tensor is first turned
  into integer indices (the output shape then no longer depends on fake data);
* a data-dependent read of a fake value (``.item()``, ``bool()``) answers 0 / False while
  the session is ``lenient`` (model construction: weight init's rejection loops; initial
  values change neither memory nor FLOPs); under :func:`strict` (a traced step) a boolean
  read still answers False (guards such as "any ties?", "any non-finite?" take their
  usual branch; counted in ``guesses``) and any other read raises :class:`FakeDataError`.

Memory: the bytes of every tensor storage alive, real or fake, counted when an op creates
it and released by a weakref finalizer when it dies: the bookkeeping of
``benchmarks/memory.py`` (which measures real runs), so a fake step and a real one are
counted alike. ``peak`` is the maximum; :meth:`FakeTrace.phase` starts a named phase whose
own peak is kept too. FLOPs: ``torch.utils.flop_counter``'s formulas (matrix products,
convolutions, attention kernels) plus CPU flash attention, whose kernel is what runs here.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Iterable, Iterator, Optional

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           FakeTensorMode, unset_fake_temporarily)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

#: tensors up to this size with only real inputs stay real (host-side index arithmetic)
SMALL_BYTES = 1 << 20

_aten = torch.ops.aten
_SCALAR_READS = (_aten._local_scalar_dense.default, _aten.is_nonzero.default)
_INDEXING = (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default)
_CPU_FLASH = _aten._scaled_dot_product_flash_attention_for_cpu.default
_CPU_FLASH_BW = _aten._scaled_dot_product_flash_attention_for_cpu_backward.default


class FakeDataError(RuntimeError):
    """A traced step read the value of a fake tensor (its control flow depends on data)."""


def _tensors(tree, out: Optional[list] = None) -> list:
    """The tensors in nested tuples / lists / dicts (what op arguments and results hold)."""
    out = [] if out is None else out
    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif isinstance(tree, (tuple, list)):
        for x in tree:
            _tensors(x, out)
    elif isinstance(tree, dict):
        for x in tree.values():
            _tensors(x, out)
    return out


def _small(t: torch.Tensor) -> bool:
    return t.numel() * t.element_size() <= SMALL_BYTES


def op_flops(func, args, kwargs, out) -> int:
    """FLOPs of one aten op (0 for ops without a formula: element-wise, views, ...)."""
    if func is _CPU_FLASH:
        q, k, v = args[:3]
        return sdpa_flop_count(q.shape, k.shape, v.shape)
    if func is _CPU_FLASH_BW:
        grad_out, q, k, v = args[:4]
        return sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape)
    formula = flop_registry.get(func._overloadpacket)
    return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


class FakeTrace(TorchDispatchMode):
    """Live storage bytes (``current``, ``peak``, per-phase peaks) and FLOPs of what runs
    under it; see the module docstring. Use through :func:`fake_session`."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes: dict[int, int] = {}  # id(storage) -> bytes, while alive
        self._refs: dict[int, weakref.ref] = {}  # id(storage) -> weak reference (its callback frees)
        self.current = self.peak = 0
        self.flops = 0
        self.ops = 0
        self._paused = 0
        self.guesses = 0  # boolean reads of fake values answered False while strict
        self.lenient = True
        self.fake_mode: Optional[FakeTensorMode] = None
        self.phases: dict[str, int] = {}  # phase -> peak bytes within it
        self.phase_flops: dict[str, int] = {}  # phase -> FLOPs counted before it began
        self._phase: Optional[str] = None

    # ------------------------------------------------------------------ memory
    def track(self, tensors: Iterable) -> None:
        """Count these tensors' storages as alive (e.g. parameters made before tracing)."""
        for t in _tensors(list(tensors)):
            st = t.untyped_storage()
            key = id(st)
            if key in self._bytes:
                continue
            n = int(st.nbytes())
            self._bytes[key] = n
            self.current += n
            if self.current > self.peak:
                self.peak = self.current
            if self._phase is not None and self.current > self.phases[self._phase]:
                self.phases[self._phase] = self.current
            self._refs[key] = weakref.ref(st, functools.partial(self._free, key))

    def _free(self, key: int, _ref=None) -> None:
        self._refs.pop(key, None)
        self.current -= self._bytes.pop(key, 0)

    def reset(self) -> None:
        """Peaks and FLOPs start again from now (what is alive stays counted)."""
        self.peak, self.flops, self.phases, self.phase_flops, self._phase = self.current, 0, {}, {}, None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing made inside is counted (bytes or FLOPs); keep none of it alive."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def phase(self, name: str) -> None:
        """From now on, also keep the peak of phase ``name``."""
        self._phase = name
        self.phases[name] = max(self.phases.get(name, 0), self.current)
        self.phase_flops.setdefault(name, self.flops)

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        inputs = _tensors((args, kwargs))
        fake = any(isinstance(t, FakeTensor) for t in inputs)
        if func in _SCALAR_READS and fake:
            t = inputs[0]
            if self.lenient or t.dtype == torch.bool:  # a guard (`if mask.any()`): the usual answer
                self.guesses += not self.lenient
                return _zero_like(t)
            raise FakeDataError(f"{func} read the value of a fake tensor: this step's control flow "
                                "depends on tensor data, which a plan cannot know")
        if fake:
            if func in _INDEXING:
                args = (args[0], _integer_indices(args[1]), *args[2:])
            if self.fake_mode is not None and not all(isinstance(t, FakeTensor) for t in inputs):
                # real inputs made fake here: the fake mode's op cache skips ops with real inputs
                args, kwargs = tree_map(self._to_fake, (args, kwargs))
            out = func(*args, **kwargs)
        else:
            out = self._maybe_real(func, args, kwargs, inputs)
        if not self._paused:
            self.flops += op_flops(func, args, kwargs, out)
            self.track(_tensors(out))
        return out

    def _to_fake(self, x):
        if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
            return self.fake_mode.from_tensor(x)
        return x

    def _maybe_real(self, func, args, kwargs, inputs):
        """Only real inputs: real if they are small and no size argument asks for a large
        output (a large real result is made fake at once); else fake."""
        if inputs and not all(_small(t) for t in inputs):
            return func(*tree_map(self._to_fake, args), **tree_map(self._to_fake, kwargs))
        if not inputs or _large_size_argument((args, kwargs)):
            try:
                out = func(*args, **kwargs)  # the fake mode below answers with shapes only
            except (DataDependentOutputException, DynamicOutputShapeException):
                out = None  # data-dependent (nonzero, item): small inputs, so small outputs
            if out is not None and not all(_small(t) for t in _tensors(out)):
                return out
        with unset_fake_temporarily():
            out = func(*args, **kwargs)
        if all(_small(t) for t in _tensors(out)):
            return out
        return tree_map(self._to_fake, out)


def _large_size_argument(tree) -> bool:
    """Some argument is a shape (a list of ints) of more than SMALL_BYTES / 8 elements."""
    if isinstance(tree, dict):
        return any(_large_size_argument(v) for v in tree.values())
    if not isinstance(tree, (tuple, list)):
        return False
    if tree and all(type(i) is int for i in tree):
        n = 1
        for i in tree:
            n *= max(i, 1)
        return n * 8 > SMALL_BYTES
    return any(_large_size_argument(v) for v in tree)


def _zero_like(t: torch.Tensor):
    if t.dtype == torch.bool:
        return False
    return 0.0 if t.dtype.is_floating_point or t.dtype.is_complex else 0


def _integer_indices(indices) -> list:
    """Real boolean masks among ``indices`` -> their integer index tensors (one per mask dim)."""
    out = []
    for i in indices:
        if i is not None and not isinstance(i, FakeTensor) and i.dtype in (torch.bool, torch.uint8):
            with unset_fake_temporarily():
                out.extend(i.nonzero().unbind(1))
        else:
            out.append(i)
    return out


@contextlib.contextmanager
def fake_session() -> Iterator[FakeTrace]:
    """Everything built or run inside is fake (beyond small host-side tensors) and traced."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    trace = FakeTrace()
    trace.fake_mode = fake
    with fake, trace:
        yield trace


@contextlib.contextmanager
def strict(trace: FakeTrace) -> Iterator[None]:
    """Inside, numeric reads of fake values raise :class:`FakeDataError` (see the module docstring)."""
    was, trace.lenient = trace.lenient, False
    try:
        yield
    finally:
        trace.lenient = was


@contextlib.contextmanager
def mapped_loads() -> Iterator[None]:
    """``torch.load`` inside reads checkpoint files memory-mapped and outside the fake
    session: tensors stay file-backed (a page is read only when its values are), small ones
    answer value questions (config inference), large ones turn fake when the model copies
    them. Files in the legacy (pre-zip) format are read whole."""
    from torch.utils._python_dispatch import _disable_current_modes

    real = torch.load

    def load(*args, **kwargs):
        with _disable_current_modes():
            try:
                return real(*args, **{"mmap": True, **kwargs})
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real
