"""Every `train.model`: builds at the sizes people use, trains a step, survives a checkpoint, trains in the pipeline."""

from typing import get_args

import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.errors import CxrError
from pipeline.models import MODEL_NAMES, build_model, load_checkpoint, vit_patch_size
from tests.conftest import run_all_stages, write_tiny_project


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_config_offers_exactly_the_models_build_model_knows():
    assert get_args(TrainConfig.model_fields["model"].annotation) == MODEL_NAMES
    assert TrainConfig().model == "vgg_gap"


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size", [28, 32, 64, 224])
def test_every_model_gives_two_logits_per_image_from_medmnist_to_full_size(name, size):
    model = build_model(name, size, 2, 0.5).eval()
    images = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(images).shape == (2, 2)


def test_parameter_counts_fit_what_each_model_is_for():
    counts = {name: parameter_count(build_model(name, 64, 2, 0.5)) for name in MODEL_NAMES}
    assert counts["vit"] < 1_000_000 and counts["cnn_gru"] < 1_000_000  # small enough to train on a CPU
    assert counts["vit"] * 10 < counts["densenet121"]
    assert 5_000_000 < counts["densenet121"] < counts["resnet18"] < counts["resnet34"]
    assert counts["vgg_gap"] < 500_000  # small: its head has 128 inputs, not a flattened map
    for name in ("densenet121", "cnn_gru", "vgg_gap"):  # no layer depends on the image size
        assert parameter_count(build_model(name, 28, 2, 0.5)) == counts[name]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_adam_step_gives_a_finite_loss_and_moves_the_weights(name):
    torch.manual_seed(0)
    model = build_model(name, 28, 2, 0.5).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    loss = nn.functional.cross_entropy(model(torch.rand(4, 1, 28, 28)), torch.tensor([0, 1, 0, 1]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(old, new) for old, new in zip(before, model.parameters()))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_round_trip_through_build_model_gives_the_same_outputs(name):
    torch.manual_seed(0)
    trained = build_model(name, 28, 2, 0.5).train()
    trained(torch.rand(4, 1, 28, 28))  # moves batch-norm running statistics away from their defaults
    images = torch.rand(3, 1, 28, 28)
    torch.manual_seed(1)  # the rebuilt model starts from different weights
    rebuilt = build_model(name, 28, 2, 0.5)
    rebuilt.load_state_dict(trained.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(images), trained.eval()(images), rtol=0, atol=0)


@pytest.mark.parametrize("size", [28, 64])
def test_vgg_gap_keeps_a_quarter_side_map_for_grad_cam_and_pools_it_to_128_features(size):
    """The last conv map stays 2-D (¼ of the side, what Grad-CAM needs) and the output layer reads 128 pooled numbers."""
    from pipeline.models import VGGGAP

    model = build_model("vgg_gap", size, 2, 0.5).eval()
    assert isinstance(model, VGGGAP)
    with torch.no_grad():
        maps = model.features(torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0)))
    assert maps.shape == (2, 128, size // 4, size // 4)
    assert [module for module in model.modules() if isinstance(module, nn.Linear)][-1].in_features == 128
    assert sum(isinstance(module, nn.BatchNorm2d) for module in model.modules()) == 6


def test_densenet_trains_on_a_batch_of_one_small_image():
    """A last batch of one image must not hit batch norm on a 1×1 map (why small inputs are enlarged to 64 px)."""
    model = build_model("densenet121", 28, 2, 0.5).train()
    assert model(torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))).shape == (1, 2)


def test_vit_patch_size_follows_the_image_size_and_logits_are_not_squashed():
    assert [vit_patch_size(size) for size in (16, 28, 32, 64, 224)] == [2, 4, 4, 8, 16]
    with pytest.raises(CxrError, match="data.image_size"):
        vit_patch_size(33)
    assert not any(isinstance(module, nn.Tanh) for module in build_model("vit", 28, 2, 0.5).modules())


def test_unknown_model_name_is_a_value_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'lenet'.*cnn_gru"):
        build_model("lenet", 28, 2, 0.5)


@pytest.mark.slow
def test_pipeline_trains_and_registers_a_model_other_than_the_default(tmp_path):
    """train.model reaches the checkpoint, the MLflow run's params and the registered version (not just the default)."""
    from pipeline.tracking import client as tracking_client, read_run_id

    other = "seed_cnn"
    assert other != TrainConfig().model  # otherwise this test proves nothing about the override
    project = run_all_stages(write_tiny_project(tmp_path), [f"train.model={other}"])
    model, state = load_checkpoint(project.paths.checkpoint)
    assert state["model"] == other and state["image_size"] == project.config.data.image_size
    assert parameter_count(model) == parameter_count(build_model(other, project.config.data.image_size, 2, 0.5))
    size = project.config.data.image_size
    assert model(torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))).shape == (2, 2)

    client = tracking_client(project.paths)
    run_id = read_run_id(project.paths)
    assert client.get_run(run_id).data.params["train.model"] == other
    version = client.get_model_version("cxr-pneumonia", str(project.results["register"].version))
    assert version.run_id == run_id  # the registered version is the model this run trained
