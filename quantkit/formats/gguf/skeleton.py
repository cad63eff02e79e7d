"""Child process: llama.cpp's own converter, writing every tensor's data as a hole (a sparse file).

The skeleton has the real converter's metadata, vocabulary and tensor list (names, shapes, types),
takes seconds and no disk space, and never reads the weights: the converter's tensors are lazy and
are only computed when written. llama_model_quantize's dry run on it gives every artifact's exact
size before the f16 file exists (`quantkit plan`, and the disk check before a build).

Usage: python -m quantkit.formats.gguf.skeleton LLAMA_CPP_TREE CONVERTER_ARGS...
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    tree = Path(argv[0])
    sys.path[:0] = [str(tree / "gguf-py"), str(tree)]  # the tree's gguf-py and conversion/, as the converter uses
    import gguf
    from gguf.gguf_writer import WriterState

    def write_tensors_as_holes(self, *, progress: bool = False) -> None:
        self.write_ti_data_to_file()
        for fout, tensors in zip(self.fout, self.tensors):
            self.write_padding(fout, fout.tell())
            for ti in tensors.values():
                fout.seek(ti.nbytes, 1)
                self.write_padding(fout, ti.nbytes)
                ti.tensor = None
            fout.truncate()  # extends the file to its full size; the skipped ranges stay unallocated
        self.state = WriterState.WEIGHTS

    gguf.GGUFWriter.write_tensors_to_file = write_tensors_as_holes
    sys.argv = [str(tree / "convert_hf_to_gguf.py"), *argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
