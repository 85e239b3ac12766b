"""Toy plugins for the Ray executor's tests, registered through an entry point as a worker finds them.

A Ray worker builds its registry from the installed entry points (group ``harness``), exactly as
``harness run`` does; it never sees plugins registered in the driver's process. So the tests give
these toys a distribution: :func:`install_entry_point` writes the metadata of a distribution
``harness-raytoys`` (what pip writes into ``site-packages``) whose entry point is
``ray_toys:plugin``; with that folder and ``tests/`` on ``PYTHONPATH``, the driver and every
worker of a local Ray instance load them like any installed plugin.

``stepper`` is the toy mean-image method plus a seeded random walk trained in a checkpointed
loop: its metrics depend on every step and on the generator's state, so a resumed fit that
restored anything wrongly ends with other metrics. It can sleep in each step (a fit that waits)
and kill its own worker process (``os._exit``) once (``die_marker``) or every time
(``die_always``), as an out-of-memory kill or a lost node would.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from harness import FitContext, MethodSpec, Prediction, Setting, TrainSet, hookimpl
from harness.settings import eval_batch_size, image_size
from toy_plugins import PAPER, SIZE, MeanImage, ToyPlugin

DISTRIBUTION = "harness_raytoys-0.0.1.dist-info"


class Stepper(MeanImage):
    """Mean image plus a per-pixel offset that a seeded random walk moves once per step."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        self.stats.register_buffer("offset", torch.zeros(1, 3, *self.input_size))

    def fit(self, train: TrainSet, context: FitContext) -> None:
        """Means as the toy method, then ``steps`` checkpointed steps of the walk."""
        super().fit(train, context)
        settings = self.settings
        generator = torch.Generator().manual_seed(int(context.seed))
        made = 0  # steps made by this process (a resumed fit starts after the restored ones)
        with context.checkpoint.stage("walk", stats=self.stats, generator=generator) as position:
            for step in range(position.epoch, settings.steps):
                if position.skip(step, 0):
                    continue
                self.stats.offset += 0.05 * torch.randn(self.stats.offset.shape, generator=generator)
                if settings.step_seconds:
                    time.sleep(settings.step_seconds)
                position.step(epoch=step, batch=1)
                made += 1
                if made == settings.die_at and self._should_die():
                    os._exit(3)  # the worker process ends here, as in an OOM kill: no cleanup, no exception
        context.info["steps"] = position.steps

    def _should_die(self) -> bool:
        if self.settings.die_always:
            return True
        marker = self.settings.die_marker
        if not marker or Path(marker).exists():
            return False
        Path(marker).write_text(str(os.getpid()))
        return True

    def predict(self, images: torch.Tensor, categories: Sequence[str]) -> Prediction:
        """Distance to the category's mean image shifted by the walk's offset."""
        idx = torch.tensor([self.categories.index(c) for c in categories], device=images.device)
        maps = (images - self.stats.means[idx] - self.stats.offset).abs().mean(1)
        return Prediction(maps, maps.flatten(1).amax(1))

    def state_dict(self) -> dict[str, Any]:
        """Means, offset and category order."""
        return {**super().state_dict(), "offset": self.stats.offset}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.stats.offset = state["offset"]


STEPPER_SETTINGS = (
    image_size(SIZE), eval_batch_size(4),
    Setting("steps", int, 6, "steps of the random walk", minimum=0),
    Setting("step_seconds", float, 0.0, "seconds each step waits (a fit that waits, not computes)", minimum=0),
    Setting("die_at", int, 3, "after this many steps of one attempt the worker may kill itself", minimum=0),
    Setting("die_marker", str, "", "kill the worker once: when this file does not exist yet (it is created)"),
    Setting("die_always", bool, False, "kill the worker at die_at on every attempt"),
)


class RayToyPlugin(ToyPlugin):
    """The toy dataset and methods, plus ``stepper``."""

    @hookimpl
    def harness_methods(self):
        """The toy methods and ``stepper``."""
        stepper = MethodSpec(name="stepper", paper=PAPER, protocols=("multiclass", "fewshot", "oneclass"),
                             profiles={"tiny": {}, "paper": {}}, factory=Stepper, settings=STEPPER_SETTINGS)
        return [*super().harness_methods(), stepper]


#: The entry point's object.
plugin = RayToyPlugin()


def install_entry_point(site: Path) -> Path:
    """Write the metadata of distribution ``harness-raytoys`` (entry point ``raytoys = ray_toys:plugin``) into ``site``.

    ``importlib.metadata`` finds it in any folder on the path, as it finds what pip installed.
    """
    info = Path(site) / DISTRIBUTION
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: harness-raytoys\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[harness]\nraytoys = ray_toys:plugin\n")
    return info
