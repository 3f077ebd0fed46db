"""Drop-in integrations with existing GRPO pipelines.

``hapo.integrations.trl``  ``HAPOGRPOTrainer``, a ``trl.GRPOTrainer`` on our kernels (+ HAPO).
``hapo.integrations.verl`` the ``"hapo"`` policy loss and advantage estimator for verl's
                           registries and a ``logprobs_from_logits`` drop-in.

Neither submodule is imported here: each needs its own extra (``hapo-kernels[trl]``,
``hapo-kernels[verl]``), and importing ``hapo`` must not require them. Importing one without
its extra raises ``ImportError`` with the install line (``missing_extra``).
"""
from __future__ import annotations

__all__ = ["missing_extra", "GIT_URL"]

# The repository URL to install from; the owner is the user's fork or the upstream's.
GIT_URL = "git+https://github.com/<owner>/hapo-kernels"


def missing_extra(module: str, extra: str, cause: ImportError) -> ImportError:
    """The ``ImportError`` for ``module`` imported without the ``extra`` it needs: names
    the missing package and gives the install line from a clone and from a git URL."""
    missing = (getattr(cause, "name", None) or str(cause)).split(".")[0]   # the package
    return ImportError(
        f"{module} needs the '{extra}' extra (missing: {missing}). Install it from a clone "
        f"with `pip install -e \".[{extra}]\"`, or with "
        f"`pip install \"hapo-kernels[{extra}] @ {GIT_URL}\"`.")
