"""`chunkattn info`: the CPU, its features and the kernel path each part takes, consistent with what runs."""

from __future__ import annotations

import json

import torch

from chunkattn import native
from chunkattn.cli import main
from chunkattn.system import FEATURES, cpu, info


def test_info_reports_the_paths_that_run(capsys):
    data = info()
    assert data["torch"] == torch.__version__ and data["native_kernels"] == native.available()
    assert set(data["cpu"]["features"]) <= set(FEATURES) and data["cpu"]["usable_cpus"] >= 1
    paths = data["paths"]
    if native.available():
        amx = bool(torch.ops.chunkattn_cpu.amx_active())
        assert ("amx tiles" in paths["attention"]) == amx
        assert ("AMX panels" in paths["linear bfloat16"]) == native.amx_linear_supported()
        assert ("chunkattn panels" in paths["linear float32"]) == native.linear_supported()
        from chunkattn.model.quant import kernel_supported

        assert ("as stored" in paths["linear quantized"]) == kernel_supported()
        if kernel_supported():  # the quantized kernel is built only where the CPU has AVX512-BF16
            assert "avx512_bf16" in cpu()["features"]
        if amx:  # the tile path runs only where the CPU says it has tiles
            assert {"amx_tile", "amx_bf16"} <= set(cpu()["features"])
    assert main(["info", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["paths"] == paths and printed["cpu"]["model"] == data["cpu"]["model"]
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "features:" in text and "attention:" in text and data["cpu"]["model"] in text
