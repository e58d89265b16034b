"""The CUDA bench's parts that run anywhere: its arguments, its refusal without CUDA, its FLOP count."""

import subprocess
import sys

import pytest
import torch

from tests.bench import gpu


def test_arguments_and_peaks():
    args = gpu.parse_args(["--runs", "3", "--out", "x.json"])
    assert args.runs == 3 and str(args.out) == "x.json"
    assert gpu.peak_tflops("NVIDIA H200") == 989.0 and gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("a GPU nobody lists") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses only without CUDA")
def test_without_cuda_it_refuses_in_one_line():
    r = subprocess.run([sys.executable, "-m", "tests.bench.gpu"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "no CUDA" in r.stderr


def test_the_step_flops_are_counted_on_the_meta_device():
    one, two = gpu.step_flops(side=64, batch=1), gpu.step_flops(side=64, batch=2)
    # SD1.5's UNet forward at 64x64 latents is about 0.8 TFLOP (400 GMACs); the frozen base's backward
    # (input gradients only) costs about as much again
    assert 1.2e12 < one < 2.4e12, one
    assert two == pytest.approx(2 * one, rel=0.02)
