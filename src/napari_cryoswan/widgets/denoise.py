"""Dock widget: denoise a map by latent projection through Cryo-SWAN, or by a classical filter.

It collects the choices, runs ``Session.denoise`` in a worker and turns the result into layers
that overlay the input: the denoised map and, when noise was added first, the noisy map, each
with its method, parameters and FSC (which the FSC plot draws) in ``layer.metadata``. Adding
noise to a clean map shows what a method does, with the clean map as the reference.
"""

from __future__ import annotations

from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, SpinBox

from ..session import DENOISE_METHODS, bundled_checkpoint
from ._jobs import Job, ModelJobWidget, typed_path

DEFAULT_METHOD = "swan-rotations"  # the best Cryo-SWAN method (docs/DENOISING.md)
# The bundled Cryo-SWAN with its encoder fine-tuned on noisy maps: same codes, better projections
# at every SNR measured (docs/DENOISING.md).
DEFAULT_CHECKPOINT = "swan-denoiser"
DEFAULT_SNR = 0.5  # the paper's protocol


class DenoiseWidget(ModelJobWidget):
    run_text = "Denoise"

    def __init__(self, viewer: napari.viewer.Viewer):  # noqa: F821 (a string: napari injects by it)
        self.method = ComboBox(label="method", choices=list(DENOISE_METHODS), value=DEFAULT_METHOD)
        self.add_noise = CheckBox(
            text="add noise first (the map is the clean reference)",
            tooltip="Add white Gaussian noise at the SNR below to the map before denoising it, "
                    "to see what a method does on a map whose clean version is known. The FSC "
                    "and metrics are then against the clean map.")
        self.snr = FloatSpinBox(
            label="SNR", value=DEFAULT_SNR, min=0.01, max=100.0, step=0.05,
            tooltip="var(clean map) / var(noise), over the whole box of the normalised map: "
                    "0.5 (the paper's) gives noise of s.d. √2 on a z-scored map.")
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1,
                            tooltip="The same seed gives the same noise.")
        super().__init__(viewer, checkpoint=bundled_checkpoint(DEFAULT_CHECKPOINT),
                         extra=(self.method, self.add_noise, self.snr, self.seed))
        # The method decides whether a checkpoint is used, so it comes first.
        self.remove(self.method)
        self.insert(self.index(self.checkpoint), self.method)
        for i, name in enumerate(DENOISE_METHODS):
            self.method.native.setItemData(i, DENOISE_METHODS[name].summary, _tooltip_role())
        self.method.changed.connect(self._method_chosen)
        self.add_noise.changed.connect(self._noise_chosen)
        self._method_chosen()
        self._noise_chosen()

    def plan_for(self, density) -> tuple[str, list[str]]:
        """The classical methods need no checkpoint."""
        checkpoint = typed_path(self.checkpoint) if self._uses_checkpoint() else None
        return self.session.describe_denoising(density, checkpoint, self.method.value)

    def compute(self, density):
        session, method = self.session, self.method.value
        checkpoint = typed_path(self.checkpoint) if self._uses_checkpoint() else None
        snr = self.snr.value if self.add_noise.value else None
        seed = self.seed.value

        def job(stage, should_stop):
            return session.denoise(density, checkpoint, method, snr=snr, seed=seed, stage=stage,
                                   should_stop=should_stop)

        return job

    def show(self, job: Job, result) -> str:
        from napari.layers import Layer

        from ..layers import denoised_layer_data, shown_already

        contour = float(job.layer.iso_threshold)
        shown = []  # the noisy map of an earlier run with the same seed is not added again
        for data in denoised_layer_data(job.layer.name, job.layer.unique_id, result, contour):
            shown.append(shown_already(self.viewer.layers, data)
                         or self.viewer.add_layer(Layer.create(*data)))
        self.viewer.layers.selection.active = shown[-1]  # the denoised map
        self.describe()  # the checkpoint is loaded now: the plan can name its own contract
        return f"Done: {', '.join(layer.name for layer in shown)}. {result.summary()}"

    def _uses_checkpoint(self) -> bool:
        return DENOISE_METHODS[self.method.value].needs_model

    def _method_chosen(self, *args) -> None:
        self.method.tooltip = DENOISE_METHODS[self.method.value].summary
        self.checkpoint.enabled = self._uses_checkpoint()
        self.describe()

    def _noise_chosen(self, *args) -> None:
        self.snr.enabled = self.seed.enabled = self.add_noise.value


def _tooltip_role():
    from qtpy.QtCore import Qt

    return Qt.ItemDataRole.ToolTipRole
