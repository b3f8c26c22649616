"""from_hf given a name: a local path that does not exist and a Hugging Face hub id that cannot be reached
(offline) each get a ValueError saying what was given and what to do; a hub id that resolves is read from
the folder huggingface_hub returns."""
import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import minihalo


def test_missing_local_folder_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ValueError, match="does not exist; expected a transformers checkpoint folder"):
        minihalo.from_hf(missing)
    with pytest.raises(ValueError, match="does not exist"):
        minihalo.from_hf(str(missing) + "/")


def test_existing_folder_without_config_is_named(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        minihalo.from_hf(tmp_path)


def test_minihalo_folder_points_at_from_pretrained(tmp_path):
    minihalo.HybridLM(minihalo.HybridConfig(num_layers=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="minihalo.HybridLM.from_pretrained"):
        minihalo.from_hf(tmp_path)


def test_unreachable_hub_id_is_neither_a_folder_nor_reachable(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="'minihalo-tests/no-such-model' is neither a local folder nor reachable "
                                         "as a Hugging Face hub id"):
        minihalo.from_hf("minihalo-tests/no-such-model")


def test_hub_id_loads_the_folder_the_hub_returns(monkeypatch, tmp_path):
    """The hub path asks huggingface_hub for the id's config and safetensors only, then reads that folder."""
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    hf.save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = minihalo.from_hf("someone/tiny-qwen3")
    assert calls == [("someone/tiny-qwen3", ["config.json", "*.safetensors"])]
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-5  # fp32, same weights: rounding only
