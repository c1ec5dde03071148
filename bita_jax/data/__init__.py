"""The data layer: prompt sources with a stable held-out split, and self-distilled datasets.

Modules: `prompts` (ShareGPT, HumanEval, JSON / JSONL sources; `is_heldout`), `run_dir` (a
distillation run's resumable raw directory), `distill` (the base model answers the prompts) and
`dataset` (the array_record tfds dataset and `load_records`, what training reads).

Nothing is imported here: `prompts` is light, `dataset` pulls in tensorflow_datasets.
"""
