"""ctest: the op library built by CMake loads into torch, and its two CPU ops (the CPU kernel and the
emulated CUDA pipeline) agree with the python backend.

Usage: python check_op_library.py path/to/libpeagle_ext_ops.so
"""

import sys

import torch

from peagle_ext._inputs import normalize_mask_inputs
from peagle_ext._python_builder import build_python


def main(library: str) -> int:
    torch.ops.load_library(library)
    mismatches = 0
    for seed, (seq_len, window, block) in enumerate([(700, None, (128, 128)), (500, 40, (64, 32)), (90, 3, (7, 5))]):
        generator = torch.Generator().manual_seed(seed)
        anchor_pos = torch.randint(0, seq_len, (3 * seq_len,), generator=generator)
        depth = torch.randint(0, 6, (3 * seq_len,), generator=generator)
        inputs = normalize_mask_inputs(anchor_pos, depth, torch.tensor([seq_len // 2, seq_len // 3]), seq_len,
                                       sliding_window=window, BLOCK_SIZE=block)
        expected = build_python(inputs)
        for op in (torch.ops.peagle_ext.build_block_index, torch.ops.peagle_ext.build_block_index_emulated):
            native = op(inputs.anchor_pos, inputs.depth, inputs.doc_of_position, window, *block)
            mismatches += sum(not torch.equal(a, b) for a, b in zip(native, expected))
    print(f"op library {library}: {mismatches} mismatching tensors of its two CPU ops against the python backend")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
