"""The CUDA kernel variants (``RNN_FAST_CUDA_VARIANTS``) as csrc/cuda/lstm_recurrence.h's ``kVariantNames`` names
them, in bit order. Read from the header without torch, so that the GPU session works even where torch or the
build is broken, and so that the tests check the other lists of them against the header."""
import re
from pathlib import Path
from typing import Tuple

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "lstm_recurrence.h"
VARIANT_ENV = "RNN_FAST_CUDA_VARIANTS"


def kernel_variants() -> Tuple[str, ...]:
    names = re.search(r"kVariantNames\[\] = \{(.*?)\};", HEADER.read_text(), re.S)
    if names is None:
        raise RuntimeError(f"{HEADER} declares no kVariantNames")
    return tuple(re.findall(r'"(\w+)"', names.group(1)))
