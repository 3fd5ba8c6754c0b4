"""Per-token routing inside an unchanged transformers LLM.

Every leaf module of the LLM that holds LLM weights (linear layers, norms,
embeddings: all per-token operations) is wrapped in a :class:`RoutedLeaf`.
A :class:`Router` says which route each token of the current call takes.
When every token takes one route, the wrapped module runs as it is, on that
route's weights (so its output is exactly the plain model's); otherwise the
tokens are grouped by route and the module runs once per group, its
working tensors switched in place (an exact XOR) to that group's route
before, so each layer's weights of only ONE route exist at any time; the
outputs are put back in token order. Attention,
rotary embeddings and everything else between those modules see the whole
sequence, untouched.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from mmer_cl.compose.weights import RoutedTensor, WeightCache
from mmer_cl.errors import MmerError


class CompositionError(MmerError):
    """A composition cannot be built or run as asked; the message says what to do."""


class Router:
    """Which route each token of the current call takes: one route for all, or a (batch, seq) tensor.

    ``last``: the route a mixed call visits last when the working tensors do not hold it at the start (the
    text route: the tokens that ``generate`` decodes next then run on it with no switch).
    """

    def __init__(self, cache: WeightCache):
        self.cache = cache
        self.single: int | None = 0
        self.routes: torch.Tensor | None = None
        self.present: list[int] = [0]
        self.last: int | None = None
        self.groups: dict[int, torch.Tensor] = {}

    def set(self, routes: torch.Tensor | int, last: int | None = None) -> None:
        self.last = last
        if isinstance(routes, int):
            self.single, self.routes, self.present, self.groups = routes, None, [routes], {}
            return
        present = sorted(int(r) for r in torch.unique(routes))
        if len(present) == 1:
            self.set(present[0], last)
        else:
            self.single, self.routes, self.present = None, routes, present
            flat = routes.reshape(-1)
            self.groups = {r: (flat == r).nonzero().squeeze(1) for r in present}

    def order(self, resident: int) -> list[int]:
        """The present routes in the order a mixed call visits them: the one the working tensors hold first,
        ``last`` last (each step an in-place switch of the working tensors)."""
        return sorted(self.present, key=lambda r: 0 if r == resident else (2 if r == self.last else 1))


class RoutedLeaf(nn.Module):
    """A per-token module whose weights come from :class:`RoutedTensor` objects, chosen per token."""

    def __init__(self, inner: nn.Module, tensors: dict[str, RoutedTensor], router: Router):
        super().__init__()
        self.inner = inner
        self._tensors = tensors
        self._list = list(tensors.values())
        self._router = router
        for name, rt in tensors.items():  # the module's parameters ARE the working tensors
            inner._parameters[name] = nn.Parameter(rt.working, requires_grad=False)

    @property
    def weight(self):  # transformers reads e.g. lm_head.weight.dtype / embed_tokens.weight
        return self.inner.weight

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def _run(self, route: int, x: torch.Tensor) -> torch.Tensor:
        tensors = self._list
        if all(rt.can_reside(route) for rt in tensors):
            # the route moves into the working tensors (exact XOR toggle in place, no copy)
            for rt in tensors:
                rt.make_resident(route)
            return self.inner(x)
        # a route that cannot live in the working tensors (rescaled mask, appended rows): a cached dense copy
        params = {name: rt.get(route, self._router.cache) for name, rt in self._tensors.items()}
        slots = self.inner._parameters
        saved = {name: slots[name] for name in params}
        try:  # run the unchanged module on this route's tensors (cheaper than torch.func.functional_call)
            slots.update(params)
            return self.inner(x)
        finally:
            slots.update(saved)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router = self._router
        single = router.single
        if single is not None:
            if all(rt.resident == single for rt in self._list):  # the steady state of one-modality decoding
                return self.inner(x)
            return self._run(single, x)
        routes = router.routes
        groups = router.groups
        if x.dim() >= 2 and x.shape[0] == routes.shape[0] and x.shape[1] < routes.shape[1]:
            routes = routes[:, routes.shape[1] - x.shape[1]:]  # e.g. lm_head on the last positions only
            flat_routes = routes.reshape(-1)
            groups = {r: (flat_routes == r).nonzero().squeeze(1) for r in router.present}
        lead = routes.shape
        if tuple(x.shape[:len(lead)]) != tuple(lead):
            raise CompositionError(f"routes of shape {tuple(lead)} do not match an input of shape "
                                   f"{tuple(x.shape)}; give one route per token")
        flat = x.reshape(-1, *x.shape[len(lead):])
        out = None
        for r in router.order(self._list[0].resident):
            sel = groups[r]
            if sel.numel() == 0:
                continue
            y = self._run(r, flat[sel])
            if out is None:
                out = y.new_empty((flat.shape[0],) + tuple(y.shape[1:]))  # every token is written once
            if y.shape[1:] != out.shape[1:]:  # a route with a grown vocabulary: pad the narrower logits
                width = max(y.shape[-1], out.shape[-1])
                out = _pad_last(out, width)
                y = _pad_last(y, width)
            out[sel] = y
        return out.view(*lead, *out.shape[1:])


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[-1] == width:
        return t
    pad = t.new_full(t.shape[:-1] + (width - t.shape[-1],), torch.finfo(t.dtype).min)
    return torch.cat([t, pad], dim=-1)


@contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory), buffers real (e.g. rotary inv_freq)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


PER_TOKEN = (nn.Linear, nn.Embedding, nn.LayerNorm)


def is_per_token(module: nn.Module) -> bool:
    return isinstance(module, PER_TOKEN) or type(module).__name__.endswith(("RMSNorm", "LayerNorm", "Norm"))


def route_modules(llm: nn.Module, tensors: dict[str, RoutedTensor], router: Router) -> int:
    """Wrap every leaf of ``llm`` holding parameters in a :class:`RoutedLeaf`; returns how many were wrapped.

    ``tensors`` maps the LLM's parameter names to their routed tensors.
    """
    wrapped = 0
    for mod_name, module in list(llm.named_modules()):
        own = dict(module.named_parameters(recurse=False))
        if not own or isinstance(module, RoutedLeaf):
            continue
        if not is_per_token(module):
            raise CompositionError(f"{mod_name} ({type(module).__name__}) holds LLM weights but is not a per-token "
                                   "module (linear, embedding, norm); per-token routing cannot compose it")
        prefix = f"{mod_name}." if mod_name else ""
        missing = [n for n in own if prefix + n not in tensors]
        if missing:
            raise CompositionError(f"LLM parameters {', '.join(prefix + n for n in missing)} have no weights in the "
                                   "base checkpoint; the base's config.json does not match its tensors")
        leaf = RoutedLeaf(module, {n: tensors[prefix + n] for n in own}, router)
        parent_name, _, attr = mod_name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        setattr(parent, attr, leaf)
        wrapped += 1
    return wrapped
