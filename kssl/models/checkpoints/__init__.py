"""Reading pretrained checkpoints from other frameworks without their runtimes.

`torch_reader` reads PyTorch `.pth`/`.pt` files (zip and legacy layouts) into numpy arrays
with numpy alone, through a restricted unpickler: a checkpoint is untrusted input.
"""

from kssl.models.checkpoints.torch_reader import (CheckpointError, UnsafeCheckpointError,
                                                  read_checkpoint, read_state_dict)

__all__ = ["CheckpointError", "UnsafeCheckpointError", "read_checkpoint", "read_state_dict"]
