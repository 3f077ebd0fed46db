"""The sparse-reward demo (``python -m hapo.demo``) and the consistency table
(``python -m hapo.demo.consistency``)."""
