"""The parts of ``tools/benchmark/gpu_check.py``: one module per job.

``parts`` runs each part timed and guarded within the total budget; ``training`` runs the
training steps of the three training configs; ``inference`` times this project's EoMT against
transformers' and looks at the attention kernels; ``train_tool`` runs ``tools/train.py --amp``;
``report`` writes the JSON and the markdown table.
"""
