"""The ground floor: what every other layer builds on, importing nothing of this repository's.

    config.py       typed YAML config (dataclasses), validated once when it is loaded
    errors.py       UserError / run_cli: one line and exit code 2 for bad input
    atomic.py       atomic file writes (temp file + rename) and writable-folder checks
    task.py         the task schema: modalities, label values, regions, how outputs decode, lesion rules
    checkpoint.py   checkpoint files (atomic save, load with one-line errors)
    distributed.py  torchrun / DistributedDataParallel set-up and the few collectives used
    boxes.py        bounding boxes of masks and crops (preprocessing, metrics, post-processing)
    logger.py       TensorBoard + metrics.jsonl, progress lines
    optim.py        optimizers and learning-rate schedules from the config

Layers, from the ground up (each imports only from the layers below it; ``tests/test_architecture.py``):
core -> datasets -> models -> losses -> metrics -> inference -> scripts (train.py, infer.py, evaluate.py, export.py).
"""
