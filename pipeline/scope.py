"""What a registered model may answer for: its scope, and the one function that decides whether a film is in it.

A model trained on chest radiographs has no business giving a CT slice a pneumonia probability: a film outside the
training data's contract gets `out_of_scope` with a reason instead of a probability. The contract (DICOM modalities,
views and body parts) is recorded with the model at registration (pipeline.register), from `serve.*` or, where those
are empty, from the training manifest; `cxr predict` and the served pyfunc both call `out_of_scope`.

After the header, the pixels: the network's out-of-distribution score (pipeline.ood) against the threshold set on
validation and stored with the model, and a check for images without structure (blank). A film without a header
(PNG, JPEG, an array) is judged by its pixels alone; a model registered before scores were stored (no `ood` entry)
judges headers only.
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
    ood_threshold: float | None = None  # the out-of-distribution score's, stored apart (the model's `ood` entry)
    min_layout_spread: float | None = None  # the blank check's floor, from the same entry (None: the default)

    def as_dict(self) -> dict[str, list[str]]:
        """As the model's metadata and model_config store it under `scope` (the threshold lives under `ood`)."""
        return {name: list(values) for name, values in asdict(self).items() if name in ("modalities", "views", "body_parts")}

    @classmethod
    def from_dict(cls, stored: dict | None, ood: dict | None = None) -> Scope:
        """From a model's metadata (`scope`, and `ood` for the score's threshold); a model registered before scopes
        were recorded gets the defaults, one registered before scores were stored no threshold."""
        stored = stored or {}
        ood = ood or {}
        threshold = float(ood["threshold"]) if ood.get("threshold") is not None else None
        floor = float(ood["min_layout_spread"]) if ood.get("min_layout_spread") is not None else None
        return cls(**{name: tuple(str(v).upper() for v in stored[name]) for name in ("modalities", "views", "body_parts")
                      if name in stored}, ood_threshold=threshold, min_layout_spread=floor)


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


def out_of_scope(image, scope: Scope, judged=None) -> str | None:
    """Why a film is outside what the model was trained for, or None when it is inside. One reason, the first
    found: a short code, then what the film carries against what the model accepts (no identifying value).

    `image` (a pipeline.imaging.DecodedImage) is judged by its header; None where there is none (an array). `judged`
    (a pipeline.ood.Judged) by its pixels, once the network has scored them; None before, or for a model without
    a stored threshold.
    """
    if image is not None and (reason := header_reason(image, scope)) is not None:
        return reason
    if judged is not None and scope.ood_threshold is not None:
        return pixel_reason(judged, scope.ood_threshold, scope.min_layout_spread)
    return None


def header_reason(image, scope: Scope) -> str | None:  # image: pipeline.imaging.DecodedImage
    """The header checks: modality, body part, view, colour, frames."""
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
    return None


def decode_refusal(exc) -> str | None:  # exc: pipeline.imaging.UnreadableImage
    """The out_of_scope reason for a file refused for what it is rather than because it could not be read: a blank
    image (decoding stops there, as ingest quarantines it) or a multi-frame object (refused before decoding, by the
    data.max_frames recorded with the model); None for a file that could not be read (an error)."""
    if exc.reason == "blank_image":
        return "ood: blank: all pixels have nearly the same value"
    if exc.reason == "too_many_frames":
        return "multi_frame: the header declares more frames than the model accepts; a chest radiograph is one"
    return None


def pixel_reason(judged, threshold: float, floor: float | None = None) -> str | None:  # judged: pipeline.ood.Judged
    """The pixel checks: no coarse structure (blank, or noise the resize averaged out), then the score."""
    from pipeline.ood import MIN_LAYOUT_SPREAD

    floor = MIN_LAYOUT_SPREAD if floor is None else floor
    if judged.layout_spread < floor:
        return (f"ood: blank: the image's coarse structure spreads {judged.layout_spread:.1f} grey levels, "
                f"a film's at least {floor:.1f}")
    if judged.score > threshold:
        return f"ood: score {judged.score:.1f} above the threshold {threshold:.1f} set on validation"
    return None
