"""Which gradients an optimizer step applies, and the layout of their rows: parameter names,
group labels (optimizer groups or GRADWATCH_GROUPS prefixes) and the caps on both."""

from __future__ import annotations

import logging
from collections.abc import Callable
from itertools import chain, compress, repeat
from operator import is_not

import numpy as np
import torch

from .config import Config
from .records import Layout

log = logging.getLogger("gradwatch")

REDUCIBLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_STRIDED = torch.strided
_STRIDED_ONLY = {torch.strided}
PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
# Unbound C-level accessors: map() over them costs a fraction of a Python-level loop per tensor.
_get_grad = torch.Tensor.grad.__get__
_get_is_cpu = torch.Tensor.is_cpu.__get__
_get_dtype = torch.Tensor.dtype.__get__
_get_layout = torch.Tensor.layout.__get__
_numel = torch.Tensor.numel


class GradientListing:
    """Lists one optimizer's gradients at each step and names their rows (cached per set)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        index: str,
        config: Config,
        name_source: Callable[[], dict[int, str]],
    ) -> None:
        self.optimizer = optimizer
        self.index = index
        self.config = config
        self._name_source = name_source
        self._names: dict[int, str] | None = None
        self._layout_key: tuple[int, ...] | None = None
        self._layout: Layout | None = None
        self.listed_cpu = False  # the last listing's gradients are all strided CPU ones
        self.listed_dtypes: set[torch.dtype] = set()  # and of these (reducible) dtypes
        # element counts of the last plain CPU gradients: (list, int64 array, float64 array)
        self._counts: tuple[list[int], np.ndarray, np.ndarray] | None = None
        self.unreduced_now = 0  # gradients of the last listing no kernel can read
        self._unreduced_logged: set[int] = set()

    def params_with_grads(self):
        """(params, grads, group index of each) of the gradients the kernels can read, in
        param-group order (sorted by device when on several). One C-level pass per property
        checked when every gradient is a strided CPU one of a reducible dtype (the usual case);
        otherwise the per-tensor listing, which also logs and counts the unreducible ones."""
        groups = self.optimizer.param_groups
        params = list(chain.from_iterable([g["params"] for g in groups]))
        grads = list(map(_get_grad, params))
        group_of = list(
            chain.from_iterable([repeat(i, len(g["params"])) for i, g in enumerate(groups)])
        )
        if len(group_of) == len(params):
            present = list(map(is_not, grads, repeat(None)))
            if not all(present):
                params = list(compress(params, present))
                grads = list(compress(grads, present))
                group_of = list(compress(group_of, present))
            if (
                grads
                and all(map(_get_is_cpu, grads))  # also: no meta tensor
                and set(map(_get_layout, grads)) == _STRIDED_ONLY
                and (dtypes := set(map(_get_dtype, grads))) <= REDUCIBLE_DTYPES
            ):
                self.unreduced_now = 0
                self.listed_cpu = True
                self.listed_dtypes = dtypes
                return params, grads, group_of
        self.listed_cpu = False
        return self.params_with_grads_listed()

    def params_with_grads_listed(self):
        params: list[torch.nn.Parameter] = []
        grads: list[torch.Tensor] = []
        group_of: list[int] = []
        unreduced = 0
        for gi, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    if g.dtype not in REDUCIBLE_DTYPES or g.layout is not _STRIDED or g.is_meta:
                        unreduced += 1
                        self._note_unreduced(p, g)
                        continue
                    params.append(p)
                    grads.append(g)
                    group_of.append(gi)
        self.unreduced_now = unreduced
        if grads and any(g.device != grads[0].device for g in grads):
            order = sorted(range(len(grads)), key=lambda i: str(grads[i].device))
            params = [params[i] for i in order]
            grads = [grads[i] for i in order]
            group_of = [group_of[i] for i in order]
        return params, grads, group_of

    def plain_cpu_counts(self, grads: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray] | None:
        """(int64, float64) element counts when the last listing was plain strided CPU tensors
        (no DTensor): the kernel's own checks are done, and the arrays are shared by readouts."""
        if not self.listed_cpu or not set(map(type, grads)) <= PLAIN_TYPES:
            return None
        counts = list(map(_numel, grads))
        cached = self._counts
        if cached is None or cached[0] != counts:
            arr = np.array(counts, dtype=np.int64)
            as_float = arr.astype(np.float64)
            arr.flags.writeable = as_float.flags.writeable = False  # shared by readouts
            cached = self._counts = (counts, arr, as_float)
        return cached[1], cached[2]

    def _note_unreduced(self, p: torch.nn.Parameter, g: torch.Tensor) -> None:
        """One log line per parameter whose gradient no kernel can read; the rest is reported."""
        if id(p) in self._unreduced_logged:
            return
        self._unreduced_logged.add(id(p))
        kind = "sparse" if g.layout is not _STRIDED else "meta" if g.is_meta else str(g.dtype)
        log.warning(
            "gradwatch: optimizer %s: the %s gradient of %s cannot be reduced; it is left out of"
            " the statistics and counted in grad_unreduced_tensors (training goes on)",
            self.index,
            kind,
            self.names().get(id(p)) or f"a {tuple(p.shape)} parameter",
        )

    def names(self) -> dict[int, str]:
        if self._names is None:
            self._names = self._name_source()
        return self._names

    def layout_for(self, params: list[torch.nn.Parameter], group_of: list[int]) -> Layout:
        key = tuple(map(id, params))
        if key != self._layout_key or self._layout is None:
            known = self.names()
            names = []
            for i, p in enumerate(params):
                name = known.get(id(p))
                names.append(name if name else f"group{group_of[i]}.param{i}")
            if self.config.groups:
                groups = [self._prefix_group(name) for name in names]
            else:
                groups = [str(g) for g in group_of]
            groups = self._cap_groups(groups)
            if self.config.per_param_here and len(names) > self.config.max_params:
                log.warning(
                    "gradwatch: %d parameters have gradients but GRADWATCH_MAX_PARAMS is %d:"
                    " grad_param_* series are exported for the first %d only",
                    len(names),
                    self.config.max_params,
                    self.config.max_params,
                )
            self._layout = Layout.build(names, groups)
            self._layout_key = key
        return self._layout

    def _prefix_group(self, name: str) -> str:
        for label, prefixes in self.config.groups:
            if any(name.startswith(x) for x in prefixes):
                return label
        return "other"

    def _cap_groups(self, groups: list[str]) -> list[str]:
        """Bound the group series: groups past the cap share one `_overflow` group."""
        order = list(dict.fromkeys(groups))
        cap = self.config.max_groups
        if len(order) <= cap:
            return groups
        keep = set(order[: cap - 1])
        log.warning(
            "gradwatch: %d parameter groups but GRADWATCH_MAX_GROUPS is %d: the last %d are"
            " merged into group _overflow",
            len(order),
            cap,
            len(order) - cap + 1,
        )
        return [g if g in keep else "_overflow" for g in groups]
