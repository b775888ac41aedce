"""Glue for the trainers users already run, each over ckptio's public API only, each an optional extra:

- ``lightning``    CkptioCheckpointIO: Lightning's CheckpointIO plugin (``Trainer(plugins=[...])``)
- ``torchtitan``   CkptioCheckpointManager: a checkpoint manager torchtitan's config selects
- ``accelerate``   save_state/load_state hooks that write the model through ckptio

Hugging Face folders (``from_pretrained``/``save_pretrained``) need no glue: ``ckptio export --hf`` writes one, and
every reader takes one (``ckptio.hf``).
"""
