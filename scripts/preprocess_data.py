"""Tokenize text files into Megatron-style PREFIX.bin / PREFIX.idx token files.

    python scripts/preprocess_data.py input=data.jsonl.gz output_prefix=out/data tokenizer=byte
    python scripts/preprocess_data.py input=corpus.txt output_prefix=out/data tokenizer=hf \
        tokenizer_path=out/bpe.json train_bpe_vocab_size=8000

Keys: input, output_prefix, tokenizer (byte|hf), tokenizer_path, train_bpe_vocab_size,
text_key, hf_cache_dir, num_workers, batch_size (see megatron_lite/data/preprocess.py).
"""

import sys
from pathlib import Path

try:
    from megatron_lite.data.preprocess import main
except ImportError:  # run from a checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from megatron_lite.data.preprocess import main

if __name__ == "__main__":
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
