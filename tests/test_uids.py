"""The one UID rule (PS3.5 9.1, pydicom's ``UID.is_valid``) the DICOM reader and the PACS client share."""

from __future__ import annotations

import warnings

import pytest
from pydicom.uid import UID

from pneumobatch.core.uids import valid_uid

GOOD = ["1.2.840.10008.1.2", "0", "1.0.3", "2.25.329800735698586629295641978511506172918", "1." + "2" * 62]
BAD = [
    "01.2",  # leading zero
    "1.02.3",
    "1.2.",  # empty components
    ".1.2",
    "1..2",
    "",
    "1.2a",  # non-digits
    "1.2/3",
    "../../etc/passwd",
    "1.-2",
    "1.2.3\n4",
    "1 .2",
    "1.2\x07",  # a control character is not padding
    "1." + "2" * 63,  # 65 characters
    "1.2\\1.3",  # two values
]


def pydicom_says(text: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # building a UID of an invalid value warns
        return UID(text).is_valid


@pytest.mark.parametrize("text", GOOD)
def test_valid_uids_are_returned_as_they_are(text: str):
    assert valid_uid(text) == text and pydicom_says(text)


@pytest.mark.parametrize("text", BAD)
def test_invalid_uids_give_an_empty_string(text: str):
    assert valid_uid(text) == ""
    assert not pydicom_says(text)


def test_64_characters_pass_and_65_do_not():
    assert len(GOOD[-1]) == 64 and valid_uid(GOOD[-1]) == GOOD[-1]
    assert len(BAD[-2]) == 65 and valid_uid(BAD[-2]) == ""


@pytest.mark.parametrize("padded", ["1.2.3\x00", " 1.2.3 ", "1.2.3 \x00", "1.2.3\x00 ", "\t1.2.3\r\n", "1.2.3\n"])
def test_whitespace_and_nul_padding_are_dropped(padded: str):
    assert valid_uid(padded) == "1.2.3"


def test_a_trailing_newline_pydicom_lets_through_is_only_padding():
    """``UID.is_valid`` matches with ``$``, which also matches before a final newline."""
    assert pydicom_says("1.2\n")
    assert valid_uid("1.2\n") == "1.2"  # stripped as whitespace, never kept in the UID
    assert valid_uid("1.2\n.3") == ""


@pytest.mark.parametrize(
    "value, expected", [(None, ""), (b"1.2.3\x00", "1.2.3"), (b"1.2\xff", ""), (UID("1.2.3"), "1.2.3")]
)
def test_other_value_types(value: object, expected: str):
    assert valid_uid(value) == expected
    assert type(valid_uid(value)) is str
