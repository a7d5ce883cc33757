"""Training, evaluation, prediction and the demo.

train.py        Trainer (AdamW groups, lr schedule, AMP, accumulation, DDP, CSV log, checkpoints, resume)
checkpoint.py   atomic safetensors + weights_only checkpoints
distributed.py  torchrun process-group helpers
evaluate.py     inference over a dataset with the PQ / AP / mIoU evaluators
predict.py      overlays and raw predictions for image files
coco_results.py COCO results files (test-dev submissions) from predict's files
demo.py         synthetic data -> train demo-tiny on CPU -> PQ before and after
host_memory.py  glibc malloc settings that keep freed host memory for reuse (the CLI's model commands)
"""
