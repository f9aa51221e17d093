import glob
import os
from collections.abc import Iterator

from safetensors import SafetensorError, safe_open


def safetensors_weights(folder: str) -> Iterator[tuple[str, object]]:
    """Every tensor of every .safetensors file in an HF folder (sharded checkpoints included), as lazy slices:
    indexing one reads just that part (a tensor-parallel rank reads only its share)."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"no .safetensors files in {folder} (pickled .bin checkpoints are not loaded)")
    for path in files:
        try:
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors file {path}: {e}") from None
