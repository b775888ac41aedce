#!/usr/bin/env bash
# Main job: save a checkpoint through the library, then inspect and reload it through the CLI.
set -euo pipefail
RUN_DIR=${RUN_DIR:-runs/demo}
python - "$RUN_DIR" <<'PY'
import sys, torch, ckptio
mgr = ckptio.CheckpointManager(sys.argv[1], keep_last=2)
policy = torch.nn.Linear(8, 2)
for epoch in range(3):
    print("saved", mgr.save_agent(policy, epoch, {"epoch": epoch}))
PY
ckptio ls "$RUN_DIR"
ckptio inspect "$RUN_DIR"
