"""Dock widget: variants of an anchor map from the latent diffusion model.

It collects the anchor, the checkpoints and the sampling settings, runs ``Session.generate`` in
a worker and adds each variant as a layer on the anchor's own grid (same shape, voxel size and
origin), so that it overlays the anchor, saves like it, and pairs with it in the FSC plot. Its
FSC against the anchor is in its metadata. "Side by side" turns on napari's grid view, which
shows each layer in its own cell without moving it.
"""

from __future__ import annotations

from magicgui.widgets import CheckBox, FileEdit, FloatSpinBox, SpinBox

from ..session import bundled_checkpoint
from ._jobs import Job, ModelJobWidget, typed_path

DEFAULT_VARIANTS = 4
MAX_VARIANTS = 32  # each variant is a layer


class GenerateWidget(ModelJobWidget):
    run_text = "Generate"

    def __init__(self, viewer: napari.viewer.Viewer):  # noqa: F821 (a string: napari injects by it)
        from ..generate import DEFAULT_STEPS, DEFAULT_STRENGTH

        self.diffusion = FileEdit(
            label="diffusion model", value="", filter="*.pt",
            tooltip="A diffusion checkpoint written by python -m training.train_diffusion for the "
                    "autoencoder above. Empty: the one beside the autoencoder (the bundled Cryo-SWAN "
                    "ships swan.diffusion.pt).")
        self.count = SpinBox(label="variants", value=DEFAULT_VARIANTS, min=1, max=MAX_VARIANTS,
                             tooltip="How many variants to make; each becomes a layer.")
        self.strength = FloatSpinBox(
            label="strength", value=DEFAULT_STRENGTH, min=0.0, max=1.0, step=0.05,
            tooltip="How far a variant may move from the anchor: 0 gives the anchor's own "
                    "reconstruction, 1 an unconditional sample that ignores the anchor.")
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1,
                            tooltip="Variant i uses seed + i: the same seed gives the same variants.")
        self.steps = SpinBox(label="sampling steps", value=DEFAULT_STEPS, min=1, max=1000,
                             tooltip="DDIM steps of a full chain (strength 1); a lower strength takes "
                                     "fewer. Fewer is faster and coarser.")
        self.side_by_side = CheckBox(text="side by side (napari's grid view)", value=True,
                                     tooltip="Show each layer in its own cell; the variants still "
                                             "overlay the anchor in space.")
        super().__init__(viewer, checkpoint=bundled_checkpoint("swan"),
                         extra=(self.diffusion, self.count, self.strength, self.seed, self.steps,
                                self.side_by_side))
        self.checkpoint.label = "autoencoder"
        self.diffusion.changed.connect(self.describe)
        self.describe()

    def plan_for(self, density) -> tuple[str, list[str]]:
        """The preprocessing, and which diffusion model will make the variants."""
        return self.session.describe_generation(density, typed_path(self.checkpoint),
                                                typed_path(self.diffusion) or None)

    def compute(self, density):
        session = self.session
        autoencoder, diffusion = typed_path(self.checkpoint), typed_path(self.diffusion) or None
        settings = dict(n=self.count.value, strength=self.strength.value, seed=self.seed.value,
                        steps=self.steps.value)

        def job(stage, should_stop):
            return session.generate(density, autoencoder, diffusion, stage=stage,
                                    should_stop=should_stop, **settings)

        return job

    def show(self, job: Job, result) -> str:
        from napari.layers import Layer

        from ..layers import generated_layer_data

        contour = float(job.layer.iso_threshold)
        added = [self.viewer.add_layer(Layer.create(*data))
                 for data in generated_layer_data(job.layer.name, job.layer.unique_id, result, contour)]
        if self.side_by_side.value and not self.viewer.canvas.grid.enabled:
            self.viewer.canvas.grid.enabled = True
            self.viewer.reset_view()  # fit every cell, not one layer's box
        self.viewer.layers.selection.active = added[0]
        correlations = ", ".join(f"{c:.2f}" for c in result.correlation_to_anchor)
        return (f"Done: {len(added)} variant{'s' * (len(added) > 1)} of {job.layer.name} at strength "
                f"{result.strength:g}. Correlation with the anchor: {correlations}.")
