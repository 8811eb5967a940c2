"""What is in a checkpoint folder, and what is wrong with it (cpmgen inspect-ckpt)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cpmgen.checkpoint.reader import architecture, open_checkpoint, stored_heads, value_problems
from cpmgen.errors import UserError


def inspect_checkpoint(path: Path, num_heads: Optional[int] = None, check_values: bool = False,
                       trust: bool = False) -> dict:
    ckpt = open_checkpoint(path, strict=False, trust=trust)
    report: dict = {
        "path": str(path),
        "format": ckpt.format,
        "iteration": ckpt.iteration,
        "mp": ckpt.mp,
        "files": [{"rank": rank, "path": str(f), "bytes": f.stat().st_size} for rank, f in enumerate(ckpt.files)],
        "num_layers": None, "hidden_size": None, "num_heads": None, "vocab_size": None, "max_positions": None,
        "preset": None, "num_params": None,
        "dtype": str(ckpt.dtype()).replace("torch.", "") if ckpt.shards and "word_embeddings.weight" in ckpt.shards[0] else None,
        "bytes": sum(f.stat().st_size for f in ckpt.files),
        "problems": list(ckpt.problems),
    }
    if ckpt.quantization:
        report["quantize"] = ckpt.quantization["quantize"]
    if ckpt.format == "megatron":
        for rank, f in zip(range(ckpt.mp), ckpt.files):
            report["files"][rank]["rank"] = int(f.name.split("_")[2])
    heads = stored_heads(ckpt) if ckpt.format == "megatron" else None
    if heads is not None and not (isinstance(heads, int) and not isinstance(heads, bool) and heads > 0):
        report["problems"].append(f"the stored training args say num_attention_heads={heads!r}, not a positive "
                                  "number; pass --set model.num_heads=N")
    if not ckpt.problems:
        try:
            args = architecture(ckpt, num_heads)
            report["num_heads"] = args.num_heads
            report["preset"] = args.preset_name()
        except UserError:  # an unknown hidden size: the shapes are still worth reporting
            args = architecture(ckpt, num_heads=1)
        if args.hidden_size % args.num_heads:
            report["problems"].append(f"{args.num_heads} attention heads do not divide the hidden size "
                                      f"{args.hidden_size}; the stored args or --set model.num_heads are wrong")
        report.update(num_layers=args.num_layers, hidden_size=args.hidden_size, vocab_size=args.vocab_size,
                      max_positions=args.max_positions, num_params=args.num_params)
        if check_values:
            report["problems"] += value_problems(ckpt)
    return report
