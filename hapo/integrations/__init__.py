"""Drop-in integrations with existing GRPO pipelines.

``hapo.integrations.trl``  ``HAPOGRPOTrainer``, a ``trl.GRPOTrainer`` on our kernels (+ HAPO).
``hapo.integrations.verl`` the ``"hapo"`` policy loss and advantage estimator for verl's
                           registries and a ``logprobs_from_logits`` drop-in.

Neither submodule is imported here: each needs its own extra (``hapo-kernels[trl]``,
``hapo-kernels[verl]``), and importing ``hapo`` must not require them.
"""
