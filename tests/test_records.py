"""Records say what happened (issue 23): the precision a run trained in, the examples a measure that skips
batches is computed on, skip warnings only for what was skipped."""
from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import vitscope
from vitscope.io.runs import run_model_spec
from vitscope.training import resolve_config, train


def test_amp_asked_on_a_cpu_is_recorded_as_the_float32_it_trained_in(tmp_path, caplog):
    cfg = resolve_config("cpu-quick", ["amp=fp16", "epochs=1", "batch_size=16", "img_size=16", "progress=false",
                                       "model_kwargs.depth=1"], model="test_vit_cifar", data="fake:n=32",
                         out=str(tmp_path / "run"), device="cpu")
    with caplog.at_level("WARNING"):
        result = train(cfg)
    assert "amp=fp16 is CUDA only; training in float32" in caplog.text
    assert result["precision"] == "float32" and run_model_spec(tmp_path / "run")["precision"] == "float32"


def test_a_measure_that_skips_a_batch_reports_the_examples_it_used():
    torch.manual_seed(0)
    model = vitscope.create_model("test_vit_cifar", num_classes=10).eval()
    ds = TensorDataset(torch.randn(11, 3, 32, 32), torch.randint(0, 10, (11,)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = vitscope.probe(model, DataLoader(ds, batch_size=4), ["cka", "attention_entropy"],
                                progress=False)  # batches 4, 4, 3: CKA skips the last (unbiased HSIC needs n > 3)
    assert any("skipped a batch of n=3" in str(w.message) for w in caught)
    assert result.meta["examples"] == 11 and result.meta["examples_by_measure"] == {"cka": 8}
    full = vitscope.probe(model, DataLoader(ds, batch_size=11), ["cka"], progress=False)
    assert "examples_by_measure" not in full.meta  # nothing skipped: nothing said
