"""Drop-in replacements under other libraries' names and signatures.

``hapo_kernels.compat.liger``  Liger-Kernel 0.8.5's ``triton_grpo_loss`` and
                               ``LigerFusedLinearGRPOLoss``.
``hapo_kernels.compat.trl``    TRL 1.16's ``selective_log_softmax``, ``entropy_from_logits``
                               and ``selective_log_softmax_and_entropy``.

Swapping the import gives the same numbers (the tests hold each against the real package);
neither submodule needs the package it imitates.
"""
