"""Which body part a DICOM header says it shows: the one vocabulary for ``not-chest``.

The reference is DICOM PS3.16 CID 4031 (Common Anatomic Regions) and the Defined
Terms of Body Part Examined (PS3.16 Annex L), plus spellings seen in local exports
and a few other languages. A value is split into words (``L-SPINE`` -> ``L``,
``SPINE``; accents removed) and each word is looked up:

* any chest word (``CHEST``, ``THORAX``, ``LUNG``, ``TORAX``, ``BRUST``...) -> chest;
* otherwise any other body-part word (``KNEE``, ``HAND``, ``TEETH``, ``PELVIS``...)
  -> that part, and the file is skipped as ``not-chest``;
* otherwise (empty, unknown words) -> unknown: the image goes on to be predicted.

BodyPartExamined decides when it holds a known word; only when it is empty or
unknown are Study Description, Series Description and Protocol Name consulted, in
that order. A site adds its own words with ``predict --chest-term`` and
``--not-chest-term``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

CHEST_TERMS = frozenset(
    {
        "CHEST",
        "THORAX",
        "THORACIC",
        "LUNG",
        "LUNGS",
        "CXR",
        "PULMONARY",
        "HEART",
        "MEDIASTINUM",
        # other languages and local spellings
        "TORAX",
        "TORACE",
        "TORACICO",
        "THORAKS",
        "BRUST",
        "BRUSTKORB",
        "LUNGE",
        "THX",
        "POITRINE",
        "PECHO",
        "BORST",
        "KLATKA",
        "POUMON",
        "POUMONS",
        "POLMONI",
    }
)

NOT_CHEST_TERMS = frozenset(
    {
        # PS3.16 Annex L / CID 4031 regions that are not the chest
        "SKULL",
        "HEAD",
        "BRAIN",
        "FACE",
        "ORBIT",
        "SINUS",
        "SINUSES",
        "NASAL",
        "MANDIBLE",
        "MAXILLA",
        "JAW",
        "TMJ",
        "TEETH",
        "TOOTH",
        "DENTAL",
        "PANORAMIC",
        "PANO",
        "OPG",
        "NECK",
        "CSPINE",
        "TSPINE",
        "LSPINE",
        "SSPINE",
        "SPINE",
        "SACRUM",
        "COCCYX",
        "ABDOMEN",
        "KUB",
        "PELVIS",
        "HIP",
        "HIPS",
        "SHOULDER",
        "HUMERUS",
        "ARM",
        "ELBOW",
        "FOREARM",
        "WRIST",
        "HAND",
        "HANDS",
        "FINGER",
        "FINGERS",
        "THUMB",
        "EXTREMITY",
        "UPPEREXTREMITY",
        "LOWEREXTREMITY",
        "LEG",
        "FEMUR",
        "THIGH",
        "KNEE",
        "KNEES",
        "PATELLA",
        "TIBIA",
        "FIBULA",
        "ANKLE",
        "FOOT",
        "FEET",
        "HEEL",
        "CALCANEUS",
        "TOE",
        "TOES",
        "BREAST",
        "MAMMO",
        "MAMMOGRAPHY",
        # other languages and local spellings
        "SCHAEDEL",
        "SCHADEL",
        "KOPF",
        "ZAEHNE",
        "ZAHNE",
        "KIEFER",
        "HALS",
        "WIRBELSAEULE",
        "WIRBELSAULE",
        "HWS",
        "BWS",
        "LWS",
        "BECKEN",
        "BAUCH",
        "SCHULTER",
        "ELLENBOGEN",
        "HANDGELENK",
        "KNIE",
        "SPRUNGGELENK",
        "FUSS",
        "CRANE",
        "DENTS",
        "COLONNE",
        "RACHIS",
        "BASSIN",
        "EPAULE",
        "COUDE",
        "POIGNET",
        "MAIN",
        "GENOU",
        "CHEVILLE",
        "PIED",
        "CRANEO",
        "DIENTES",
        "COLUMNA",
        "HOMBRO",
        "CODO",
        "MUNECA",
        "MANO",
        "RODILLA",
        "TOBILLO",
        "PIE",
        "CRANIO",
        "DENTI",
        "COLONNA",
        "BACINO",
        "SPALLA",
        "GOMITO",
        "POLSO",
        "GINOCCHIO",
        "CAVIGLIA",
        "PIEDE",
        "ADDOME",
    }
)

#: Header keywords consulted, in order, when BodyPartExamined does not decide.
DESCRIPTION_KEYWORDS = ("StudyDescription", "SeriesDescription", "ProtocolName")

_WORD = re.compile(r"[A-Z]+")


def words(value: object) -> list[str]:
    """Upper-case ASCII words of a header value (accents removed, digits and punctuation split)."""
    text = unicodedata.normalize("NFKD", str(value or "")).encode("ascii", "ignore").decode().upper()
    return _WORD.findall(text)


@dataclass(frozen=True)
class BodyPartVocabulary:
    """Chest and non-chest words, with a site's additions."""

    chest: frozenset[str] = CHEST_TERMS
    not_chest: frozenset[str] = NOT_CHEST_TERMS

    @classmethod
    def with_site_terms(cls, chest: Iterable[str] = (), not_chest: Iterable[str] = ()) -> BodyPartVocabulary:
        extra_chest = {w for term in chest for w in words(term)}
        extra_other = {w for term in not_chest for w in words(term)}
        return cls(CHEST_TERMS | extra_chest, (NOT_CHEST_TERMS | extra_other) - extra_chest)

    def classify(self, value: object) -> Optional[str]:
        """``"CHEST"`` for a chest value, the first non-chest word found, or ``None`` if unknown."""
        found = words(value)
        if any(w in self.chest for w in found):
            return "CHEST"
        for w in found:
            if w in self.not_chest:
                return w
        return None


DEFAULT_VOCABULARY = BodyPartVocabulary()


def examined_part(
    headers: dict[str, object], vocabulary: BodyPartVocabulary = DEFAULT_VOCABULARY
) -> tuple[Optional[str], str]:
    """The body part a header shows and the keyword that said so: ``(part or None, keyword)``.

    ``headers`` maps DICOM keywords (BodyPartExamined and :data:`DESCRIPTION_KEYWORDS`)
    to their values. ``part`` is ``"CHEST"``, a non-chest vocabulary word, or ``None``.
    """
    for keyword in ("BodyPartExamined", *DESCRIPTION_KEYWORDS):
        part = vocabulary.classify(headers.get(keyword))
        if part is not None:
            return part, keyword
    return None, ""
