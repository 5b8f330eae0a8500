"""Shared fixtures. Real bundled models load once per test run (session scope, from the cache)."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run under its interpreter; this must be set before anything
# imports triton (transformers and torch may), so it lives here rather than in a test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gemma():
    import mechkit

    return mechkit.load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def smollm2():
    import mechkit

    return mechkit.load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session", params=["llama", "gpt2", "gemma3"])
def tiny(request):
    from mechkit.models.synthetic import tiny_model

    kv = {} if request.param == "gpt2" else {"n_kv_heads": 2}
    return tiny_model(request.param, n_layers=3, d_model=32, n_heads=4, d_mlp=64, **kv)


@pytest.fixture(scope="session")
def tiny_llama():
    from mechkit.models.synthetic import tiny_model

    return tiny_model("llama", n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
