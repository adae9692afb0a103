"""The training recipe (sft_trainer.py) and what it leaves behind (checkpoint.py, metrics.py)."""
