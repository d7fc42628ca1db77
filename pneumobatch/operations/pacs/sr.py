"""One DICOM Structured Report per study and model (TID 1500, built with ``highdicom``).

Document: a Comprehensive 3D SR (the SOP class highdicom writes TID 1500 in) holding an
Imaging Measurement Report whose observer is the algorithm (a device). For every
predicted image of the study there is one Measurement Group (TID 1501) per evaluated
finding: the positive class of a binary model (``pneumonia``), every class of a
multi-class model. Each group has

- Finding: the finding's code (SNOMED CT where one exists, see :data:`FINDING_CODES`;
  else ``99PNEUMOBATCH``, the class name);
- a qualitative evaluation *finding = Present / Absent* (SCT 52101004 / 2667000): the
  model's decision at the operating point used;
- measurements *Probability* and, for binary models, *Decision threshold* (unit ``1``;
  local codes ``99PNEUMOBATCH PROBABILITY / THRESHOLD``);
- for a two-level model (a card with a ``hierarchy``), in the group of the decided class
  only: a qualitative evaluation *Organism = <fine class>* (``99PNEUMOBATCH ORGANISM``; the
  fine class coded ``99PNEUMOBATCH``, :func:`organism_code`) and a measurement *Organism
  probability* (``99PNEUMOBATCH ORGANISM PROB``, unit ``1``): the CSV's ``fine_label`` and
  its probability in ``fine_top3``, checked by :func:`organism_of` (a fine class that is
  the coarse class itself, ``normal`` or ``covid-19``, adds nothing and is left out);
- Algorithm Identification: model name, pneumobatch version, and parameters
  ``weights_sha256=...``, ``operating_point=...``, the operating point's meaning and
  ``NOT FOR DIAGNOSTIC USE``;
- Source: the image, by SOP Class and SOP Instance UID.

The SR has the source study's Study Instance UID and copies its patient and study
modules from the source headers (only those attributes, see
:data:`~pneumobatch.operations.pacs.archive.HEADER_KEYWORDS`); it goes into a new series described
as "not for diagnostic use", is flagged PRELIMINARY and UNVERIFIED, and names
pneumobatch and the model in the Contributing Equipment Sequence.

UIDs are deterministic (pydicom ``generate_uid(entropy_srcs=...)``): the series from the
study, the model name and the weights' SHA-256; the SR from the study, the weights'
SHA-256 and the result itself. Pushing the same results again yields the same SOP
Instance UID (the archive keeps one object); a changed model or result yields a new one.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from pneumobatch import __version__
from pneumobatch.core.card import ModelCard, decide_indices, resolve_threshold
from pneumobatch.core.hierarchy import parse_top_text

MANUFACTURER = "pneumobatch"
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE: research and quality assurance only"
SERIES_NUMBER = 9900
LOCAL_SCHEME = "99PNEUMOBATCH"

#: Codes of the findings our tasks predict; other class names get a local code.
FINDING_CODES = {
    "pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "normal": Code("17621005", "SCT", "Normal"),
    "bacterial": Code("53084003", "SCT", "Bacterial pneumonia"),
    "viral": Code("75570004", "SCT", "Viral pneumonia"),
    "covid-19": Code("840539006", "SCT", "COVID-19"),
}
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
PROBABILITY = Code("PROBABILITY", LOCAL_SCHEME, "Probability")
THRESHOLD = Code("THRESHOLD", LOCAL_SCHEME, "Decision threshold")
#: A two-level model's fine class below the decided finding, and its probability (local codes:
#: SNOMED CT's organism codes do not cover the fallback classes such as ``other viral``).
ORGANISM = Code("ORGANISM", LOCAL_SCHEME, "Organism")
ORGANISM_PROBABILITY = Code("ORGANISM PROB", LOCAL_SCHEME, "Organism probability")
#: Longest code value (SH).
SH_MAX = 16
NO_UNITS = Code("1", "UCUM", "no units")
CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
#: Longest LO value (model name, series description, code meanings): what DICOM allows.
LO_MAX = 64
#: How far a CSV probability may be from its threshold (or a rival class) and still be
#: taken either way: predict decides on the unrounded value and writes 6 decimals.
ROUNDING = 1e-6


def finding_code(cls: str) -> Code:
    return FINDING_CODES.get(cls.lower()) or Code(cls[:16].upper(), LOCAL_SCHEME, cls[:64])


def organism_code(name: str) -> Code:
    """The local code of a fine class: its name in capitals, or, over :data:`SH_MAX` characters,
    its first 9 and 6 hex digits of its SHA-256 (two long names never share a code)."""
    value = name.upper()
    if len(value) > SH_MAX:
        value = f"{value[:9]}~{hashlib.sha256(name.encode('utf-8')).hexdigest()[:6]}"
    return Code(value, LOCAL_SCHEME, name[:LO_MAX])


@dataclass(frozen=True)
class ImageResult:
    """One predicted image of a study, as predict wrote it in the CSV."""

    sop_instance_uid: str
    series_instance_uid: str
    probs: tuple[tuple[str, float], ...]  # (class, probability) in the card's order
    pred_label: str
    threshold: Optional[float]
    operating_point: str
    path: str = ""
    row: int = 0  # the CSV row it came from (spreadsheet numbering: the header is row 1)
    heatmap: str = ""  # the CSV's heatmap cell (predict --heatmaps), untrusted
    fine_label: str = ""  # the CSV's fine_label cell (two-level models), untrusted
    fine_top: str = ""  # the CSV's fine_top3 cell, untrusted
    fine_prob: str = ""  # the CSV's fine_prob cell (absent before 0.2.x's fine_prob column), untrusted


@dataclass(frozen=True)
class Organism:
    """The fine class below an image's decided class and its probability: the SR's organism item."""

    name: str
    probability: float


@dataclass(frozen=True)
class StudyResult:
    """What one model said about one study: the content of one SR."""

    study_instance_uid: str
    card: ModelCard
    images: tuple[ImageResult, ...]

    @property
    def weights_sha256(self) -> str:
        return self.card.weights_sha256

    def fingerprint(self) -> str:
        """The result as canonical text: what makes the SR new when it changes (the organism items
        too: the checked ``fine_label`` and its probability; absent for one-level models, so their
        SRs keep the UIDs they had)."""
        organisms = {i.sop_instance_uid: organism_of(self.card, i)[0] for i in self.images}
        return json.dumps(
            {
                "model": self.card.name,
                "images": sorted(
                    [
                        i.sop_instance_uid,
                        i.pred_label,
                        [[c, round(p, 6)] for c, p in i.probs],
                        i.threshold,
                        i.operating_point,
                    ]
                    for i in self.images
                ),
                # push --heatmaps: the SR lists the images' heatmap SCs, so they are part of its content
                **(
                    {"heatmaps": sorted([i.sop_instance_uid, i.heatmap] for i in self.images if i.heatmap)}
                    if any(i.heatmap for i in self.images)
                    else {}
                ),
                **(
                    {
                        "organisms": sorted(
                            [uid, o.name, round(o.probability, 6)] for uid, o in organisms.items() if o is not None
                        )
                    }
                    if any(o is not None for o in organisms.values())
                    else {}
                ),
            },
            sort_keys=True,
        )

    @property
    def series_instance_uid(self) -> str:
        return generate_uid(
            entropy_srcs=["pneumobatch-sr-series", self.study_instance_uid, self.card.name, self.weights_sha256]
        )

    @property
    def sop_instance_uid(self) -> str:
        return generate_uid(
            entropy_srcs=["pneumobatch-sr", self.study_instance_uid, self.weights_sha256, self.fingerprint()]
        )


def text_problem(value: str, what: str, limit: int = LO_MAX) -> Optional[str]:
    """Why ``value`` cannot be written as a DICOM LO value (control characters, a backslash,
    over ``limit`` characters, empty), or None. The value itself is never quoted."""
    if not value:
        return f"{what} is empty"
    if len(value) > limit:
        return f"{what} is longer than {limit} characters"
    if not value.isprintable() or "\\" in value:
        return f"{what} holds control characters or a backslash"
    return None


def card_problem(card: ModelCard) -> Optional[str]:
    """Why the SR cannot name this model truthfully (its name, classes or weights), or None."""
    for value, what in [(card.name, "the model name"), (card.weights_sha256 or "unknown", "the weights' SHA-256")]:
        problem = text_problem(value, what)
        if problem:
            return problem
    for cls in card.classes:
        problem = text_problem(str(cls), "a class name")
        if problem:
            return problem
    return None


def _finite_probability(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value) and 0.0 <= value <= 1.0


def image_problem(card: ModelCard, image: ImageResult) -> Optional[str]:
    """Why the SR cannot state this image's result (or None): a probability that is not a
    number in [0, 1], a threshold outside [0, 1], an operating point that cannot be written,
    or a ``pred_label`` other than what the card's rule gives for the probabilities and
    threshold (a finding reported Absent at P=0.9998). CSV values are never quoted."""
    probs = dict(image.probs)
    for cls in card.classes:
        if not _finite_probability(probs.get(cls)):
            return f"the probability of {cls} is not a number in [0, 1]"
    if image.threshold is not None and not _finite_probability(image.threshold):
        return "the threshold is not a number in [0, 1]"
    problem = text_problem(image.operating_point, "operating_point")
    if problem:
        return problem
    if image.pred_label not in card.classes:
        return "pred_label is not one of the model's classes"
    values = np.array([[probs[c] for c in card.classes]])
    threshold = image.threshold if card.binary else None
    offsets = card.log_offsets
    expected = card.classes[int(decide_indices(values, card.classes, card.positive, threshold, offsets)[0])]
    if card.binary:  # 6 decimals: a probability at its threshold may go either way
        near = abs(probs[str(card.positive)] - resolve_threshold(threshold)) <= ROUNDING
    elif offsets is None:  # nor may a near tie
        near = max(probs.values()) - probs[image.pred_label] <= ROUNDING
    else:  # nor a near tie of log p + offset: the label's best case against the others' worst
        values = values[0]
        best = values + ROUNDING
        worst = np.clip(values - ROUNDING, 0.0, None)
        label = card.classes.index(image.pred_label)
        with np.errstate(divide="ignore"):
            score = np.log(worst) + np.asarray(offsets)
            score[label] = np.log(best[label]) + offsets[label]
        near = int(np.argmax(score)) == label
    if image.pred_label != expected and not near:
        return f"pred_label disagrees with the probabilities (the model's rule gives {expected})"
    return None


def organism_of(card: ModelCard, image: ImageResult) -> tuple[Optional[Organism], Optional[str]]:
    """The organism item of an image of a two-level model, and why there is none when there
    should be one (a one-line warning: the SR still goes, with the coarse finding).

    ``fine_label`` must be one of the card's fine classes, below ``pred_label``, and the most
    probable fine class below it among those ``fine_top3`` lists; ``fine_top3`` must be well
    formed. Its probability is ``fine_prob`` (which must agree with ``fine_top3`` where that lists
    it); a CSV without that column (older versions) must list it in ``fine_top3``, or have it alone
    below its class (then it is that class's probability). It is at most that of ``pred_label``. A
    fine class that is the
    coarse class itself (``normal``, ``covid-19``) adds nothing: (None, None), as for a one-level
    model. CSV values are never quoted."""
    tree = card.tree
    if tree is None:
        return None, None
    label = image.fine_label.strip()
    if not label:
        return None, "fine_label is empty"
    if label not in tree.fine:
        return None, "fine_label is not one of the model's fine classes"
    if tree.parent[tree.fine.index(label)] != image.pred_label:
        return None, "fine_label is not below pred_label in the model's hierarchy"
    if label == image.pred_label:
        return None, None
    problem = text_problem(label, "fine_label")
    if problem:
        return None, problem
    parts = [part for part in image.fine_top.split(";") if part.strip()]
    ranked = parse_top_text(image.fine_top)
    names = [name for name, _ in ranked]
    if not parts or len(ranked) != len(parts) or len(set(names)) != len(names) or not set(names) <= set(tree.fine):
        return None, "fine_top3 is malformed"
    top = dict(ranked)
    coarse_p = dict(image.probs).get(image.pred_label)
    if image.fine_prob.strip():
        try:
            stated = float(image.fine_prob)
        except ValueError:
            return None, "fine_prob is not a number"
        if not math.isfinite(stated) or stated < 0:
            return None, "fine_prob is not a probability"
        if label in top and abs(top[label] - stated) > ROUNDING:
            return None, "fine_prob disagrees with fine_label's probability in fine_top3"
        top[label] = stated
    if label not in top and tree.parent.count(image.pred_label) == 1 and coarse_p is not None:
        top[label] = coarse_p  # the only fine class below its class: its probability is the class's
    if label not in top:
        return None, "fine_top3 does not give fine_label's probability"
    p = top[label]
    if p > dict(image.probs).get(image.pred_label, 0.0) + ROUNDING:
        return None, "fine_label's probability exceeds its class's"
    siblings = [top[n] for n in names if n != label and tree.parent[tree.fine.index(n)] == image.pred_label]
    if any(q > p + ROUNDING for q in siblings):
        return None, "fine_label is not the most probable fine class below pred_label in fine_top3"
    return Organism(label, p), None


def operating_point_meaning(card: ModelCard, operating_point: str, threshold: Optional[float]) -> str:
    """What the operating point means, in one sentence (written into the SR)."""
    if operating_point == "log-offsets" and threshold is None:
        return "the class with the highest log probability plus its offset (chosen on validation) is reported"
    if operating_point == "argmax" or threshold is None:
        return "the most probable class is reported (no threshold)"
    band_point = (card.thresholds.get("by_age_band") or {}).get(operating_point.removeprefix("site-")) or {}
    target = band_point.get("target_recall", card.thresholds.get("target_recall"))
    chosen = (
        f"chosen on validation images for {float(target):.0%} sensitivity"
        if isinstance(target, (int, float))
        else "the model's shipped threshold"
    )
    where = (
        f"for the {operating_point} age band (from PatientAge)"
        if operating_point not in ("pooled", "")
        else "for all ages"
    )
    return f"{card.positive} is Present when its probability >= {threshold:.4f}, {where}; {chosen}"


def _algorithm(card: ModelCard, image: ImageResult):
    import highdicom as hd

    parameters = [
        f"weights_sha256={card.weights_sha256}",
        f"operating_point={image.operating_point}",
        operating_point_meaning(card, image.operating_point, image.threshold),
        NOT_FOR_DIAGNOSIS,
    ]
    return hd.sr.AlgorithmIdentification(
        name=card.name[:64], version=f"pneumobatch {__version__}"[:64], parameters=parameters
    )


def _groups(result: StudyResult, evidence: dict[str, Dataset]) -> list:
    import highdicom as hd

    card = result.card
    evaluated = [card.positive] if card.binary else list(card.classes)
    groups = []
    for n, image in enumerate(sorted(result.images, key=lambda i: i.sop_instance_uid), start=1):
        source = hd.sr.SourceImageForMeasurementGroup(
            evidence[image.sop_instance_uid].SOPClassUID, image.sop_instance_uid
        )
        probs = dict(image.probs)
        for cls in evaluated:
            code = finding_code(cls)
            measurements = [hd.sr.Measurement(name=PROBABILITY, value=float(probs[cls]), unit=NO_UNITS)]
            if card.binary and image.threshold is not None:
                measurements.append(hd.sr.Measurement(name=THRESHOLD, value=float(image.threshold), unit=NO_UNITS))
            evaluations = [hd.sr.QualitativeEvaluation(name=code, value=PRESENT if image.pred_label == cls else ABSENT)]
            found = organism_of(card, image)[0] if image.pred_label == cls else None
            if found is not None:
                evaluations.append(hd.sr.QualitativeEvaluation(name=ORGANISM, value=organism_code(found.name)))
                measurements.append(
                    hd.sr.Measurement(name=ORGANISM_PROBABILITY, value=float(found.probability), unit=NO_UNITS)
                )
            tracking = hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[result.sop_instance_uid, image.sop_instance_uid, cls]),
                identifier=f"image {n} {cls}"[:64],
            )
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    finding_type=code,
                    algorithm_id=_algorithm(card, image),
                    measurements=measurements,
                    qualitative_evaluations=evaluations,
                    source_images=[source],
                )
            )
    return groups


def evidence_dataset(
    header: Dataset, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
) -> Dataset:
    """A clean copy of what the SR takes from a source image: its UIDs and SOP class, and
    the patient and study modules (absent attributes empty, nothing else copied)."""
    from pneumobatch.operations.pacs.archive import HEADER_KEYWORDS

    ds = Dataset()
    for keyword in HEADER_KEYWORDS:
        if keyword in header and header[keyword].value is not None:
            setattr(ds, keyword, header[keyword].value)
        elif keyword != "SpecificCharacterSet":
            setattr(ds, keyword, "")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        study_instance_uid,
        series_instance_uid,
        sop_instance_uid,
    )
    return ds


def build_sr(result: StudyResult, evidence: dict[str, Dataset], captures: Sequence[Dataset] = ()) -> Dataset:
    """The SR of ``result``; ``evidence`` maps each image's SOP Instance UID to
    :func:`evidence_dataset` of its header; ``captures`` (the heatmap SCs sent with it) join
    the evidence, so the SR references them."""
    import highdicom as hd

    card = result.card
    ordered = [evidence[i.sop_instance_uid] for i in sorted(result.images, key=lambda i: i.sop_instance_uid)]
    ordered += sorted(captures, key=lambda ds: str(ds.SOPInstanceUID))
    device_uid = generate_uid(entropy_srcs=["pneumobatch-device", card.name, card.weights_sha256])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=card.name[:64]
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=_groups(result, evidence),
    )
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=card.name[:64],
        software_versions=[f"pneumobatch {__version__}"[:64], card.weights_sha256[:64] or "unknown weights"],
        contribution_description=f"Automated chest X-ray classification by model {card.name}. {NOT_FOR_DIAGNOSIS}",
    )
    with warnings.catch_warnings():
        # highdicom warns about odd person names, quoting them: no patient name on stderr
        warnings.simplefilter("ignore", UserWarning)
        return hd.sr.Comprehensive3DSR(
            evidence=ordered,
            content=report,
            series_instance_uid=result.series_instance_uid,
            series_number=SERIES_NUMBER,
            sop_instance_uid=result.sop_instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            contributing_equipment=[equipment],
            series_description=f"{card.name} AI result - NOT FOR DIAGNOSTIC USE"[:64],
        )
