"""The support matrix: which objective x method x backend (x quantized base) combinations run, enforced.

Built from data: each registered trainer's objective and backend class (``methods``, ``objectives``,
``quantizers``, ``packing``, ``refused``), the objective table (methods it allows) and each method's
``quantized_base`` and ``packing``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmtune.core.errors import InvalidOptionError


@dataclasses.dataclass(frozen=True)
class Support:
    """One row: trainer ``name`` on ``backend`` trains ``methods``; ``quantized`` of them on a quantized base."""

    name: str
    backend: str
    objective: str
    methods: tuple[str, ...]
    quantized: tuple[str, ...]
    quantizers: tuple[str, ...] | None   #: quantizer names accepted (None: any trainable one)
    packing: tuple[str, ...] = ()        #: methods that train on packed examples here
    refused: tuple[tuple[str, str], ...] = ()   #: (method, why this backend does not train it)


def support_of(cls: Any) -> Support:
    """The row of a `RecipeTrainer` class."""
    from llmtune.trainers.methods import METHODS, get_method
    from llmtune.trainers.objectives import OBJECTIVES, objective_packs

    allowed = OBJECTIVES[cls.objective][1] if cls.objective in OBJECTIVES else None
    backend = cls.engine
    methods = tuple(m for m in backend.methods if m in METHODS and (allowed is None or m in allowed))
    if cls.objective not in backend.objectives:
        methods = ()
    quantized = tuple(m for m in methods if get_method(m).quantized_base)
    packs = objective_packs(cls.objective)
    packing = tuple(m for m in methods if packs and backend.packing and get_method(m).packing)
    refused = tuple((m, why) for m, why in backend.refused.items() if m not in methods)
    return Support(cls.name, cls.backend, cls.objective, methods, quantized, backend.quantizers, packing, refused)


def support_matrix() -> list[Support]:
    """Every registered recipe trainer's row (trainers that cannot load here are left out)."""
    from llmtune.core.registry import REGISTRY
    from llmtune.trainers.base import RecipeTrainer

    rows = []
    for info in REGISTRY.list("trainer"):
        try:
            cls = REGISTRY._entry("trainer", info.name, info.backend).load()
        except Exception:  # reported by list_backends already
            continue
        if isinstance(cls, type) and issubclass(cls, RecipeTrainer):
            rows.append(support_of(cls))
    return rows


def _describe(rows: list[Support]) -> str:
    parts = []
    for r in rows:
        q = f" (quantized base: {', '.join(r.quantized) or 'none'})"
        parts.append(f"{r.name}/{r.backend}: {', '.join(r.methods) or 'nothing'}{q}")
    return "; ".join(parts)


def check_supported(trainer: Any, options: Any) -> None:
    """`InvalidOptionError` naming the supported combinations unless ``options`` fit this trainer's row."""
    from llmtune.trainers.objectives import objective_packs

    row = support_of(type(trainer))
    method, q = options.method, options.quantizer
    why = dict(row.refused).get(method)
    if why is not None:
        raise InvalidOptionError(f"option method={method!r}: trainer {row.name!r} (backend {row.backend!r}) does "
                                 f"not train it: {why}")
    if getattr(options, "packing", False) and not objective_packs(row.objective):
        raise InvalidOptionError(f"option packing=True: objective {row.objective!r} does not pack (pretrain already "
                                 "trains on fixed-length blocks of the streamed text; preference objectives score "
                                 "whole sequences); packing is an sft option", field="packing")
    if getattr(options, "packing", False) and method in row.methods and method not in row.packing:
        where = (f"method {method!r} gives every packed example the same virtual tokens"
                 if row.packing else f"backend {row.backend!r} does not pass the per-example mask to its loss")
        raise InvalidOptionError(f"option packing=True: trainer {row.name!r} (backend {row.backend!r}) does not pack "
                                 f"for method={method!r} ({where}); packing methods here: "
                                 f"{', '.join(row.packing) or 'none'}")
    if method in row.methods and (q is None or method in row.quantized) and (
            q is None or row.quantizers is None or q.name in row.quantizers):
        return
    what = f"method={method!r}" + (f" on a {q.name}-quantized base" if q is not None else "")
    if q is not None and row.quantizers is not None and q.name not in row.quantizers and method in row.methods:
        what = f"quantizer {q.name!r} (accepted: {', '.join(row.quantizers)})"
    others = [r for r in support_matrix() if r.objective == row.objective and r != row]
    raise InvalidOptionError(f"option method: trainer {row.name!r} (backend {row.backend!r}) does not support "
                             f"{what}. Supported: {_describe([row, *others])}",
                             field="quantizer" if what.startswith("quantizer") else "method")
