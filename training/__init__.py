"""Training, evaluation and analysis of the two shipped tiny models, kept out of the installed
package (which holds only the models and what serving, the demo and the tests need).

Run from the repository root, e.g. ``python -m training.train OUT ...``; the scripts import
their shared model inputs from :mod:`bacon_sglang.models.batches`. The records of the shipped
runs are in ``tiny_doc/`` and ``tiny_vqa/`` (see ``README.md``).
"""
