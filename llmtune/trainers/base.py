"""`RecipeTrainer`: a registered trainer = an objective (its name) x a backend, run by the shared loop.

A trainer class holds no loop code: ``train`` checks the combination against the support matrix and hands
everything to `llmtune.trainers.loop.run`. `trainer_class` makes one for a plugin's backend. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from llmtune.core.interfaces import Trainer
from llmtune.core.results import TrainResult
from llmtune.trainers.backend import TrainerBackend


class RecipeTrainer(Trainer):
    """Objective ``objective`` on backend ``engine``; options checked against the support matrix."""

    objective: ClassVar[str] = "sft"
    engine: ClassVar[type[TrainerBackend]] = TrainerBackend

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        from llmtune.trainers.matrix import check_supported

        check_supported(self, self.options)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return cls.engine.unavailable_reason()

    def make_backend(self) -> TrainerBackend:
        """A fresh backend instance for one run."""
        return self.engine()

    def _merged_options(self, overrides: dict[str, Any]) -> Any:
        from llmtune.core.options import build_options
        from llmtune.trainers.matrix import check_supported

        base = self.options
        merged = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        unknown = [k for k in overrides if k not in merged]
        if unknown:
            build_options(self.Options, {k: overrides[k] for k in unknown}, where=self.describe())
        merged.update(overrides)
        opts: Any = build_options(self.Options, merged, where=self.describe())
        check_supported(self, opts)
        return opts

    def train(self, model: Any, data: Any, *, eval_data: Any = None, tokenizer: Any = None,
              output_dir: str | os.PathLike[str] | None = None, resume: bool | str | os.PathLike[str] = False,
              callbacks: Sequence[Any] = (), overwrite: bool = False, allow_changes: Sequence[str] = (),
              **overrides: Any) -> TrainResult:
        """Train ``model`` (path, hub id, ``nn.Module``, or a config for a fresh model) on ``data``.

        ``data``/``eval_data``: what the objective reads (``sft``: a records file, a list of records, or a
        list of pre-tokenized examples; ``pretrain``: text files, directories or a list of strings).
        ``resume``: False, "auto" (newest checkpoint in ``output_dir`` if any) or a checkpoint path.
        ``callbacks``: `llmtune.trainers.callbacks.Callback` objects. ``output_dir`` belongs to one run: another
        run's directory is refused unless ``overwrite=True``; a resume whose settings or data changed is refused
        unless each changed field is named in ``allow_changes`` (e.g. ``("max_steps",)``). Any option can be
        overridden by keyword.
        """
        from llmtune.trainers._checkpoint import check_allow_changes
        from llmtune.trainers.loop import NOT_RUN_IDENTITY, run

        opts = self._merged_options(overrides) if overrides else self.options
        allowed = check_allow_changes(allow_changes, opts, free=NOT_RUN_IDENTITY)
        out = Path(output_dir if output_dir is not None else opts.output_dir)
        return run(self, opts, model, data, eval_data=eval_data, tokenizer=tokenizer, output_dir=out,
                   resume=resume, callbacks=list(callbacks), overwrite=overwrite, allow_changes=allowed)


def trainer_class(objective: str, backend: type[TrainerBackend], *, name: str | None = None) -> type[RecipeTrainer]:
    """A registrable trainer class for ``objective`` on ``backend`` (for plugins: one call per objective).

        register_trainer(trainer_class("sft", MyBackend))      # then get_trainer("sft", backend="mine")
    """
    from llmtune.trainers.objectives import get_objective

    obj = get_objective(objective)
    attrs = {"name": name or objective, "backend": backend.name, "objective": objective, "engine": backend,
             "Options": backend.options_class(obj.Options), "__module__": backend.__module__,
             "__doc__": f"``{objective}`` on the ``{backend.name}`` backend."}
    cls: type[RecipeTrainer] = type(f"{backend.__name__}_{objective}", (RecipeTrainer,), attrs)
    return cls
