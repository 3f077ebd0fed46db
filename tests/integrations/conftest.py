"""Integration tests against the real TRL and verl packages.

They run only from ``make test-integrations``, which builds a virtual environment per
package (.venv-trl, .venv-verl: their transformers pins differ) and sets
``HAPO_INTEGRATION_TESTS=1``. A plain ``make test`` in .venv (neither package installed)
does not collect this folder at all, so nothing here counts as skipped there.
Nothing is fetched from any hub: models and tokenizers are built in code.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("HAPO_INTEGRATION_TESTS") != "1":
    collect_ignore_glob = ["test_*.py"]
