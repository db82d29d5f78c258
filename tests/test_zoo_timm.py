"""timm coverage: a fixed sample of families through every step of `benchmarks/zoo_timm.py`
(its full sweep writes benchmarks/results/zoo_timm.md). Slow: about 20 s a model on one core."""
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("zoo_timm", ROOT / "benchmarks" / "zoo_timm.py")
zoo_timm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo_timm)

# residual CNN, BatchNormAct + DropPath CNN, ViT (defaults bound, functional LayerNorm), ConvNeXt,
# MobileViT (timm's no-trace registry)
SAMPLE = ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224", "convnext_atto", "mobilevit_xxs"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLE)
def test_timm_model_passes_every_step(name):
    result = zoo_timm.run_model(name)
    assert result["steps"] == {step: "ok" for step in zoo_timm.STEPS}, result["steps"]
    assert result["max_diff"]["modes"] == 0.0  # train and eval, built in either mode, bit for bit
