"""runtime.py: the dtype policy (bf16 only where it is fast, decided by measuring), explicit dtypes, --help."""
import argparse

import pytest
import torch

import runtime


@pytest.mark.parametrize("speedup, dtype, says", [
    (1 / 49, torch.float32, "dtype: float32 (no native bf16 on this CPU: a bf16 matmul is 49.0x slower than fp32)"),
    (1.8, torch.bfloat16, "dtype: bfloat16 (native bf16 on this CPU: a bf16 matmul is 1.8x faster than fp32)"),
    (1.1, torch.float32, "dtype: float32 (no native bf16 on this CPU: a bf16 matmul is 1.1x faster than fp32)"),
])
def test_auto_takes_bf16_only_where_it_measures_clearly_faster(monkeypatch, capsys, speedup, dtype, says):
    monkeypatch.setattr(runtime, "bf16_matmul_speedup", lambda: speedup)
    assert runtime.pick_dtype("auto", torch.device("cpu")) == dtype
    assert capsys.readouterr().err.strip() == says


def test_an_explicit_dtype_wins_without_measuring(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "bf16_matmul_speedup", lambda: pytest.fail("measured although a dtype was given"))
    for name, dtype in runtime.DTYPES.items():
        assert runtime.pick_dtype(name, torch.device("cpu")) == dtype
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("supported, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda_follows_bf16_support(monkeypatch, supported, dtype):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    assert runtime.pick_dtype("auto", torch.device("cuda")) == dtype


def test_the_measurement_compares_the_two_dtypes():
    assert runtime.bf16_matmul_speedup() > 0


def test_help_shows_defaults_once(capsys):
    p = argparse.ArgumentParser(formatter_class=runtime.HelpFormatter)
    p.add_argument("--ckpt", help="leave out for the default")
    p.add_argument("--n", type=int, default=3, help="how many")
    p.add_argument("--zero", type=int, default=0, help="zero")
    p.add_argument("--flag", action="store_true", help="a switch")
    text = p.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "how many (default: 3)" in text and "zero (default: 0)" in text
