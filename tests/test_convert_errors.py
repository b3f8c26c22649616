"""from_hf's messages when a checkpoint cannot be found: a local path that does not exist, and a Hugging Face
hub id that cannot be reached (offline). Both must say what was given and what to do, as a ValueError."""
import huggingface_hub.constants
import pytest

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


def test_unreachable_hub_id_is_neither_a_folder_nor_reachable(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="'minihalo-tests/no-such-model' is neither a local folder nor reachable "
                                         "as a Hugging Face hub id"):
        minihalo.from_hf("minihalo-tests/no-such-model")
