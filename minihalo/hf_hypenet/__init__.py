"""The files minihalo.export copies into a transformers folder: configuration_hypenet.py and modeling_hypenet.py.
They import only torch and transformers (and their own folder), so the exported model runs without minihalo."""
