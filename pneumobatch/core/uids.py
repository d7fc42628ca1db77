"""The one rule for DICOM UIDs that pneumobatch reads from files and archives.

A UID is accepted when it follows DICOM PS3.5 section 9.1: at most 64 characters of
dot-separated numeric components, each ``0`` or digits without a leading zero, none
empty. That is the rule of :attr:`pydicom.uid.UID.is_valid` (its pattern
:data:`pydicom.uid.RE_VALID_UID` and length limit), matched here over the whole text:
``is_valid`` uses ``re.match`` with ``$``, which lets a trailing newline through, and
building a :class:`~pydicom.uid.UID` of an invalid value warns. Surrounding whitespace
and NUL bytes (DICOM pads a UID to an even length with one NUL) are dropped first;
anything else makes the value invalid.

The DICOM reader (study, series and instance UIDs, the transfer syntax) and the PACS
client (UIDs an archive sends, later used as file names) both use :func:`valid_uid`, so
an identifier a results CSV records is one the archive side accepts: a result is only
ever tied to a study by a UID both sides read the same way.
"""

from __future__ import annotations

from pydicom.uid import RE_VALID_UID

#: PS3.5 9.1: a UID holds at most 64 characters.
MAX_UID_LENGTH = 64


def valid_uid(value: object) -> str:
    """``value`` as UID text (padding removed) when it is a valid DICOM UID, else ``""``.

    ``None``, empty values and bytes that are not ASCII give ``""``; a valid UID is never
    truncated or otherwise repaired.
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return ""
    text = str(value or "").strip().strip("\x00").strip()
    return text if len(text) <= MAX_UID_LENGTH and RE_VALID_UID.fullmatch(text) else ""
