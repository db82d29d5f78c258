"""timm and transformers coverage: a fixed sample through every step of `benchmarks/zoo_timm.py`
(its full sweep writes benchmarks/results/zoo_timm.md). Slow: about 20 s a model on one core."""
import pytest
from benchmark_modules import load_benchmark

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

zoo_timm = load_benchmark("zoo_timm")

# residual CNN, BatchNormAct + DropPath CNN, ViT (defaults bound, functional LayerNorm), ConvNeXt,
# MobileViT (timm's no-trace registry), a relative-position ViT (masked fused attention in ONNX);
# BERT-, GPT-2- and ViT-style transformers, and DeiT (not in transformers' fx tracer: torch.export)
SAMPLE = ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224", "convnext_atto", "mobilevit_xxs", "test_vit_relpos",
          "hf-bert", "hf-gpt2", "hf-vit", "hf-deit"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLE)
def test_model_passes_every_step(name):
    result = zoo_timm.run_model(name)
    assert result["steps"] == {step: "ok" for step in zoo_timm.STEPS}, result["steps"]
    assert result["max_diff"]["modes"] == 0.0  # train and eval, built in either mode, bit for bit
    assert result["capture"] == ("export" if name == "hf-deit" else "fx")
