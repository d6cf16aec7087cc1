"""Name -> mechanism, with the metadata the CLI, the README and the benchmarks read.

Every mechanism class is registered once with :func:`register`; users build one with
:func:`create` and browse with :func:`list_mechanisms` / :func:`info`. Names are
lower-case snake_case and stable: they appear in configs, YAMLs and checkpoints.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .checks import LAYOUTS

if TYPE_CHECKING:  # the layers import this module to register themselves
    from .layers.base import AttentionModule

FAMILIES = (
    "channel",
    "spatial",
    "channel_spatial",
    "branch",
    "temporal",
    "token_local",
    "token_global",
    "token_feature_space",
    "multi_view",
    "restoration",
    "workspace",
    "sequence",
)

#: layout name -> the tensor layout a mechanism takes and returns

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MechanismInfo:
    """What the registry knows about one mechanism."""

    name: str
    cls: type
    family: str
    layout: str
    paper: str
    year: int | None
    cost: str = ""
    captures: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)

    def cls_signature(self) -> inspect.Signature:
        """The constructor's signature without ``self`` (for binding arguments)."""
        sig = inspect.signature(self.cls.__init__)
        return sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "self"])

    @property
    def signature(self) -> str:
        """The constructor signature with this name's bound defaults, e.g. ``(dim, num_heads)``."""
        sig = inspect.signature(self.cls.__init__)
        params = [
            p.replace(
                annotation=inspect.Parameter.empty,
                default=self.defaults.get(p.name, p.default),
            )
            for p in sig.parameters.values()
            if p.name != "self"
        ]
        return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))

    @property
    def summary(self) -> str:
        """First line of the class docstring."""
        doc = inspect.getdoc(self.cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def describe(self) -> str:
        """A multi-line human description, used by ``spatial-attention info``."""
        lines = [
            f"{self.name}: {self.summary}",
            f"  class:    {self.cls.__module__}.{self.cls.__qualname__}",
            f"  family:   {self.family}",
            f"  layout:   {self.layout} {LAYOUTS[self.layout]}",
            f"  paper:    {self.paper}" + (f" ({self.year})" if self.year else ""),
            f"  signature: {self.name}{self.signature}",
        ]
        if self.defaults:
            lines.append(f"  registered defaults: {self.defaults}")
        if self.cost:
            lines.append(f"  cost:     {self.cost}")
        if self.captures:
            lines.append(f"  captures: {self.captures}")
        auto = getattr(self.cls, "auto_impl", "auto")
        lines.append(f"  attn_impl: {', '.join(self.attn_impls)}"
                     + (f" (auto runs {auto})" if auto != "auto" else ""))
        return "\n".join(lines)

    @property
    def attn_impls(self) -> tuple[str, ...]:
        """The implementations ``attn_impl=`` accepts for this mechanism."""
        return tuple(getattr(self.cls, "attn_impls", ("auto", "explicit")))


_REGISTRY: dict[str, MechanismInfo] = {}


def register(
    name: str,
    *,
    family: str,
    layout: str,
    paper: str,
    year: int | None = None,
    cost: str = "",
    captures: str = "",
    **defaults: Any,
) -> Callable[[type], type]:
    """Class decorator that registers a mechanism under ``name``.

    ``defaults`` are constructor keyword arguments bound to this name, so one class can
    be registered twice (``dot_product`` and ``scaled_dot_product`` share a class).
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"mechanism name {name!r} must be lower-case snake_case")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} for {name!r}; expected one of {FAMILIES}")
    if layout not in LAYOUTS:
        raise ValueError(
            f"unknown layout {layout!r} for {name!r}; expected one of {tuple(LAYOUTS)}"
        )

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"mechanism {name!r} is already registered to {_REGISTRY[name].cls}")
        _REGISTRY[name] = MechanismInfo(
            name=name,
            cls=cls,
            family=family,
            layout=layout,
            paper=paper,
            year=year,
            cost=cost,
            captures=captures,
            defaults=dict(defaults),
        )
        names = getattr(cls, "registered_names", ())
        cls.registered_names = (*names, name)
        return cls

    return deco


def _ensure_loaded() -> None:
    # Registration happens at import of the layer modules; importing the package's
    # layers here keeps `registry` usable on its own.
    from . import layers  # noqa: F401


def unknown_name_error(kind: str, name: str, known: list[str]) -> ValueError:
    """A ValueError naming the closest known names, shared by mechanisms and models."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if not close:
        close = [k for k in known if name and (name in k or k in name)][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown {kind} {name!r}{hint} (see `spatial-attention list` for all {len(known)})"
    )


def canonical(name: Any) -> Any:
    """``name`` as registered: names are lower case, so ``SE`` finds ``se``."""
    return name.strip().lower() if isinstance(name, str) else name


def info(name: str) -> MechanismInfo:
    """Metadata of a registered mechanism (any case); unknown names list the closest ones."""
    _ensure_loaded()
    try:
        return _REGISTRY[canonical(name)]
    except (KeyError, TypeError):
        raise unknown_name_error("mechanism", str(name), sorted(_REGISTRY)) from None


def create(name: str, *args: Any, **kwargs: Any) -> AttentionModule:
    """Build mechanism ``name`` (any case): ``name``'s class called with these arguments
    and the defaults registered under the name (``scaled_dot_product`` is
    ``dot_product`` with ``scaled=True``). Every mechanism is an
    :class:`~spatial_attention.layers.base.AttentionModule`; ``info(name).cls`` is its
    class, ``info(name).signature`` (``spatial-attention info NAME``) its arguments.

    The first arguments follow the mechanism's layout (see ``LAYOUTS``):

    * ``map`` ``(B, C, H, W)``: ``create(name, channels, ...)``; the module maps
      ``(B, C, H, W)`` to the same shape (``sk``, deformable convolutions: ``out_channels``).
    * ``tokens`` ``(B, H, W, C)``: ``create(name, dim, num_heads, ...)`` (``num_heads``
      has a default in some); ``(B, H, W, C)`` in and out.
    * ``sequence`` ``(B, N, C)``: ``multi_head(dim, num_heads)``, ``shared_workspace(dim)``
      (``(B, N, C)`` in and out); ``dot_product()`` / ``scaled_dot_product()`` and
      ``additive(query_dim, key_dim, hidden_dim)`` are called as
      ``(queries, keys, values, valid_lens=None)``; ``rims(input_size)``.
    * ``clip`` ``(B, T, C, H, W)``: ``create(name, channels, ...)``; the same shape out.

    All take ``attn_impl`` (``"auto"`` fast path, ``"explicit"`` the paper's math). A
    misspelt or missing argument is a TypeError naming the mechanism, the closest
    argument and the signature; an invalid value a ValueError naming the mechanism.

    >>> import spatial_attention as sa
    >>> attn = sa.create("multi_head", 64, 4)
    >>> se = sa.create("se", 64, reduction=8)
    """
    entry = info(name)
    try:
        bound = entry.cls_signature().bind(*args, **{**entry.defaults, **kwargs})
    except TypeError as exc:  # a misspelt or missing argument: show what it takes
        close = difflib.get_close_matches(
            next(iter(set(kwargs) - set(entry.cls_signature().parameters)), ""),
            list(entry.cls_signature().parameters), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"{entry.name}: {exc}{hint}; signature: "
                        f"{entry.name}{entry.signature}") from None
    try:
        module = entry.cls(*bound.args, **bound.kwargs)
    except ValueError as exc:
        raise ValueError(_named(entry.name, entry.cls, str(exc))) from None
    # one class may serve several names: errors should name the one the user asked for
    module.registered_name = entry.name
    return module


def _named(name: str, cls: type, message: str) -> str:
    """A constructor's refusal under the name the user asked for: the class's own name
    replaced (twins_lsa is a window_attention), or the asked name put in front (a part
    such as BOAT's window branch refused)."""
    primary = (getattr(cls, "registered_names", ()) or (None,))[0]
    if primary and primary != name and message.startswith(f"{primary}:"):
        return f"{name}:{message[len(primary) + 1:]}"
    return message if message.startswith(f"{name}:") else f"{name}: {message}"


def list_mechanisms(family: str | None = None, layout: str | None = None) -> list[str]:
    """Sorted names of registered mechanisms, optionally filtered."""
    _ensure_loaded()
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {tuple(LAYOUTS)}")
    return sorted(
        n
        for n, e in _REGISTRY.items()
        if (family is None or e.family == family) and (layout is None or e.layout == layout)
    )


def markdown_table() -> str:
    """The mechanism table of the README, generated from the registry."""
    _ensure_loaded()
    rows = ["| name | family | layout | paper | year |", "|---|---|---|---|---|"]
    order = {f: i for i, f in enumerate(FAMILIES)}
    for e in sorted(_REGISTRY.values(), key=lambda e: (order[e.family], e.name)):
        rows.append(
            f"| `{e.name}` | {e.family} | {e.layout} `{LAYOUTS[e.layout]}` | {e.paper} | "
            f"{e.year or ''} |"
        )
    return "\n".join(rows)
