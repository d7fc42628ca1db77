"""Device, precision and backend choices as library calls: an unknown value is an OptionError naming the allowed ones."""

from __future__ import annotations

import pytest
import torch

from pneumobatch.core.errors import EXIT_USAGE, OptionError
from pneumobatch.model.device import BACKENDS, PRECISIONS, resolve_backend, resolve_precision


def test_unknown_backend_is_an_option_error_naming_the_backends():
    with pytest.raises(OptionError) as caught:
        resolve_backend("tensorrt", torch.device("cpu"), None)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--backend tensorrt:")
    assert all(b in message for b in BACKENDS)
    assert caught.value.exit_code == EXIT_USAGE


def test_unknown_precision_is_an_option_error_not_auto():
    with pytest.raises(OptionError) as caught:
        resolve_precision("fp8", torch.device("cpu"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--precision fp8:")
    assert all(p in message for p in PRECISIONS)
    assert caught.value.exit_code == EXIT_USAGE


def test_known_precisions_resolve_as_before():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("fp16", cpu) is torch.float16
