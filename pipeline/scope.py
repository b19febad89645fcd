"""What a registered model may answer for: its scope, and the one function that decides whether a film is in it.

A model trained on chest radiographs has no business giving a CT slice a pneumonia probability: a film outside the
training data's contract gets `out_of_scope` with a reason instead of a probability. The contract (DICOM modalities,
views and body parts) is recorded with the model at registration (pipeline.register), from `serve.*` or, where those
are empty, from the training manifest; `cxr predict` and the served pyfunc both call `out_of_scope`.

Only the header is judged today. An image-based out-of-distribution score (the network's own features) belongs in
`out_of_scope` too, after the header checks: a film without a header (PNG, JPEG) is judged by its pixels alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Used where neither serve.* nor the training data name any (a model trained on PNGs or MedMNIST arrays).
DEFAULT_MODALITIES = ("CR", "DX", "DR")
DEFAULT_VIEWS = ("PA", "AP")
DEFAULT_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "LUNGS", "THORAX_CHEST", "CHEST_PA", "CHEST_AP")


@dataclass(frozen=True)
class Scope:
    """The header values a film may carry (upper case); an absent header value is not held against a film."""

    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    views: tuple[str, ...] = DEFAULT_VIEWS
    body_parts: tuple[str, ...] = DEFAULT_BODY_PARTS

    def as_dict(self) -> dict[str, list[str]]:
        """As the model's metadata and model_config store it."""
        return {name: list(values) for name, values in asdict(self).items()}

    @classmethod
    def from_dict(cls, stored: dict | None) -> Scope:
        """From a model's metadata; a model registered before scopes were recorded gets the defaults."""
        stored = stored or {}
        return cls(**{name: tuple(str(v).upper() for v in stored[name]) for name in ("modalities", "views", "body_parts")
                      if name in stored})


def contract(modalities: list[str], views: list[str], body_parts: list[str], trained_modalities: list[str],
             trained_views: list[str]) -> Scope:
    """The scope a model is registered with: what serve.* names, else what its training films carried, else the
    defaults. `trained_*` are the training manifest's header values ('' where a film had no header)."""

    def chosen(configured: list[str], trained: list[str], default: tuple[str, ...]) -> tuple[str, ...]:
        values = configured or sorted({str(v).upper() for v in trained if v})
        return tuple(str(v).upper() for v in values) or default

    return Scope(modalities=chosen(modalities, trained_modalities, DEFAULT_MODALITIES),
                 views=chosen(views, trained_views, DEFAULT_VIEWS),
                 body_parts=tuple(str(v).upper() for v in body_parts) or DEFAULT_BODY_PARTS)


def out_of_scope(image, scope: Scope) -> str | None:  # image: pipeline.imaging.DecodedImage
    """Why `image` is outside what the model was trained for, or None when it is inside. One reason, the first
    found: a short code, then what the film carries against what the model accepts (no identifying value)."""
    if image.modality and image.modality.upper() not in scope.modalities:
        return f"modality: {image.modality.upper()} is not one of {', '.join(scope.modalities)}"
    if image.body_part and image.body_part.upper() not in scope.body_parts:
        return f"body_part: {image.body_part.upper()} is not one of {', '.join(scope.body_parts)}"
    if image.view and image.view.upper() not in scope.views:
        return f"view: {image.view.upper()} is not one of {', '.join(scope.views)}"
    if image.colour:
        return "colour: the image holds colour; chest radiographs are grey"
    if image.frames > 1:
        return f"multi_frame: {image.frames} frames; a chest radiograph is one"
    # The image-based out-of-distribution score goes here (films without a header are judged by it alone).
    return None
