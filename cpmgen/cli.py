"""The `cpmgen` command. Each subcommand is a typed function whose docstring is its --help.

Bad input raises UserError anywhere below; `main` prints it on one line and exits 2 (no
traceback unless --debug or CPMGEN_DEBUG=1).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cpmgen import console
from cpmgen.config import Settings, load_settings
from cpmgen.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Run CPM-1 to write lyrics and novels of unlimited length, exactly and fast.")

# Options shared by the commands, declared once.
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model folder (Megatron or HF); default model.path or $CPMGEN_MODEL.", show_default=False)]
VocabOpt = Annotated[Optional[str], typer.Option("--vocab", help="chinese_vocab.model; default: tokenizer.vocab, or in/beside the model folder.", show_default=False)]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file (sections model, tokenizer, runtime, window, sampling, generate).", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key, e.g. --set model.num_heads=4 (repeatable).", show_default=False)]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda [default: runtime.device, auto]", show_default=False)]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="auto, fp32, bf16 or fp16 [default: runtime.dtype, auto: fp32 on CPU]", show_default=False)]
QuantizeOpt = Annotated[Optional[str], typer.Option("--quantize", help="none, int8 or int4: int8 or 4-bit weights, about 4x or 7x less weight memory to read per token than fp32 [default: runtime.quantize, none].", show_default=False)]
CompileOpt = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the decode step (a CUDA graph on GPU) after a one-time compile of tens of seconds; on CPU the default prepacked linears are faster [default: runtime.compile, off].", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
MpOpt = Annotated[Optional[int], typer.Option("--mp", help="Model-parallel ranks: relaunches through torchrun with N local ranks (gloo on CPU, NCCL on GPU) [default: runtime.mp, 1].", show_default=False)]
StrideOpt = Annotated[Optional[int], typer.Option("--stride", help="Tokens dropped per window slide [default: window.stride].", show_default=False)]


def settings_from(config: Optional[str], sets: Optional[list[str]], task: Optional[str] = None, *,
                  model: Optional[str] = None, vocab: Optional[str] = None, device: Optional[str] = None,
                  dtype: Optional[str] = None, quantize: Optional[str] = None,
                  compiled: Optional[bool] = None) -> Settings:
    """Config files and --set first, then the explicit options, which win."""
    settings = load_settings(config, sets, task)
    if model is not None:
        settings.model.path = model
    if vocab is not None:
        settings.tokenizer.vocab = vocab
    if device is not None:
        settings.runtime.device = device
    if dtype is not None:
        settings.runtime.dtype = dtype
    if quantize is not None:
        settings.runtime.quantize = quantize
    if compiled is not None:
        settings.runtime.compile = compiled
    return settings


def print_json(obj) -> None:
    if main_rank():
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def main_rank() -> bool:
    """Rank 0 of a model-parallel run (or the only process) owns stdout, --json and --output."""
    return os.environ.get("RANK", "0") == "0"


def model_parallel(settings: Settings) -> tuple[int, int]:
    """(rank, world) of this process. With --mp N > 1 outside torchrun, the command relaunches
    itself through torchrun with N local ranks and exits with their exit code."""
    from cpmgen import parallel
    from cpmgen.loading import resolve_device

    world = parallel.world_size(settings.runtime.mp)
    if world == 1:
        return 0, 1
    if not parallel.under_torchrun():
        from cpmgen.checkpoint.reader import open_checkpoint, resolve_args
        from cpmgen.loading import model_path

        # Fail here, once, on what every rank would fail on; opening is cheap (memory-mapped).
        parallel.check_split(resolve_args(open_checkpoint(model_path(settings)), settings.model), world)
        raise typer.Exit(parallel.launch(world, sys.argv[1:], os.environ.get("CPMGEN_DEBUG") == "1"))
    rank, world = parallel.init(resolve_device(settings.runtime.device).type)
    if rank != 0:
        console.silence()
    return rank, world


def load_for(settings: Settings, rank: int = 0, world: int = 1):
    """Load the model (this rank's shard under --mp) with a progress bar."""
    from cpmgen.checkpoint.reader import open_checkpoint
    from cpmgen.loading import load_model, model_path

    ckpt = open_checkpoint(model_path(settings), rank=rank, world=world)
    with console.progress("loading weights", total=len(ckpt.names())) as advance:
        return load_model(settings, advance=advance, checkpoint=ckpt, rank=rank, world=world)


def tokenizer_for(settings: Settings, vocab_size: Optional[int] = None):
    from cpmgen.tokenizer import CPMTokenizer, find_vocab

    path = find_vocab(None, settings.tokenizer.vocab, settings.model.path)
    tokenizer = CPMTokenizer(path)
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise UserError(f"{path}: vocab has {tokenizer.vocab_size} pieces but the model {settings.model.path} "
                        f"has vocab size {vocab_size}; pass the --vocab the model was trained with")
    return tokenizer


# ----------------------------------------------------------------------------- checkpoints


@app.command("inspect-ckpt")
def inspect_ckpt(
    path: Annotated[Optional[str], typer.Argument(help="Checkpoint folder [default: model.path or $CPMGEN_MODEL].", show_default=False)] = None,
    check_values: Annotated[bool, typer.Option("--check-values", help="Also scan every tensor for NaN/Inf.")] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
):
    """Show what a checkpoint folder holds and what is wrong with it.

    Exit 0 when sound, 1 when problems are found, 2 when the folder is unusable."""
    from cpmgen.inspection import inspect_checkpoint
    from cpmgen.loading import model_path

    settings = settings_from(config, sets, model=path)
    report = inspect_checkpoint(model_path(settings), settings.model.num_heads, check_values)
    if as_json:
        print_json(report)
    else:
        _print_report(report)
    raise typer.Exit(1 if report["problems"] else 0)


def _print_report(report: dict) -> None:
    from rich.table import Table

    out = console.stdout
    out.print(f"[bold]{report['path']}[/bold]  format {report['format']}, iteration {report['iteration']}, "
              f"model-parallel size {report['mp']}")
    files = Table("rank", "file", "size", box=None, pad_edge=False)
    for f in report["files"]:
        files.add_row(str(f["rank"]), f["path"], _size(f["bytes"]))
    out.print(files)
    if report["num_layers"] is not None:
        heads = report["num_heads"] if report["num_heads"] is not None else "? (pass --set model.num_heads=N)"
        out.print(f"architecture: {report['preset'] or 'custom'}: {report['num_layers']} layers, hidden "
                  f"{report['hidden_size']}, {heads} heads, vocab {report['vocab_size']}, "
                  f"{report['max_positions']} positions")
        out.print(f"parameters: {report['num_params']:,} ({report['dtype']}, {_size(report['bytes'])} on disk)")
        if report.get("quantize"):
            out.print(f"quantized: {report['quantize']} linear weights (cpmgen quantize); embeddings and "
                      f"LayerNorms {report['dtype']}")
    if report["problems"]:
        out.print(f"[red]{len(report['problems'])} problem(s):[/red]")
        for problem in report["problems"]:
            out.print(f"  - {problem}", markup=False)
    else:
        out.print("[green]no problems found[/green]")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _open_for_writing(settings: Settings):
    from cpmgen.checkpoint.reader import open_checkpoint, resolve_args
    from cpmgen.loading import model_path

    ckpt = open_checkpoint(model_path(settings))
    if ckpt.format == "quantized":
        raise UserError(f"{ckpt.path}: a quantized folder cannot be resharded, converted or quantized again; "
                        "use the checkpoint it was made from")
    return ckpt, resolve_args(ckpt, settings.model)


def _write_megatron_folder(ckpt, args, mp: int, output: Path, force: bool) -> None:
    from cpmgen.checkpoint.writer import check_mp, write_megatron
    from cpmgen.fileio import atomic_folder

    check_mp(ckpt, args, mp)
    if output.resolve() == ckpt.path.resolve():
        raise UserError(f"{output}: the output would overwrite the source checkpoint; choose another --output")
    with atomic_folder(output, force=force) as tmp, console.progress(f"writing mp={mp}", len(ckpt.names()) * mp) as advance:
        write_megatron(tmp, ckpt, args, mp, advance)


@app.command()
def reshard(
    path: Annotated[Optional[str], typer.Argument(help="Checkpoint folder [default: model.path or $CPMGEN_MODEL].", show_default=False)] = None,
    mp: Annotated[int, typer.Option("--mp", help="Target model-parallel size: any N dividing heads, hidden and vocab.")] = ...,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output folder [default: DIR_MP<N> beside DIR].", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
):
    """Split or merge a checkpoint to another model-parallel size (any N that divides the split dimensions).

    The source is never touched; the output is written to a temporary folder and renamed
    into place, keeping the iteration and RNG states and setting mp_world_size."""
    settings = settings_from(config, sets, model=path)
    ckpt, args = _open_for_writing(settings)
    source = ckpt.path.resolve()
    target = Path(output) if output else source.parent / f"{source.name}_MP{mp}"
    _write_megatron_folder(ckpt, args, mp, target, force)
    result = {"source": str(ckpt.path), "source_mp": ckpt.mp, "output": str(target), "mp": mp,
              "files": sorted(str(p) for p in target.rglob("mp_rank_*.pt"))}
    if as_json:
        print_json(result)
    else:
        console.stdout.print(f"wrote {target} (model-parallel size {ckpt.mp} -> {mp}, {mp} rank file(s))")


@app.command()
def convert(
    path: Annotated[Optional[str], typer.Argument(help="Checkpoint folder [default: model.path or $CPMGEN_MODEL].", show_default=False)] = None,
    to: Annotated[str, typer.Option("--to", help="Target format: hf or megatron.")] = ...,
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder.")] = ...,
    mp: Annotated[int, typer.Option("--mp", help="Model-parallel size of a megatron output.")] = 1,
    vocab: VocabOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
):
    """Export to an HF GPT2LMHeadModel folder (config.json, model.safetensors, spiece.model), or back to Megatron."""
    from cpmgen.checkpoint.hf import write_hf
    from cpmgen.fileio import atomic_folder
    from cpmgen.tokenizer import find_vocab

    settings = settings_from(config, sets, model=path, vocab=vocab)
    ckpt, args = _open_for_writing(settings)
    target = Path(output)
    if to == "megatron":
        _write_megatron_folder(ckpt, args, mp, target, force)
    elif to == "hf":
        try:
            vocab_path = find_vocab(None, settings.tokenizer.vocab, settings.model.path)
        except UserError:
            if settings.tokenizer.vocab:
                raise
            vocab_path = None
            console.warn("no chinese_vocab.model found: the HF folder will have no spiece.model (pass --vocab)")
        with atomic_folder(target, force=force) as tmp:
            write_hf(tmp, dict(ckpt.full_tensors()), args, vocab_path)
    else:
        raise UserError(f"--to {to}: choose hf or megatron")
    console.stdout.print(f"wrote {target} ({to})")


@app.command("quantize")
def quantize_command(
    path: Annotated[Optional[str], typer.Argument(help="Checkpoint folder [default: model.path or $CPMGEN_MODEL].", show_default=False)] = None,
    to: Annotated[str, typer.Option("--to", help="int8 or int4 (4-bit weights in groups of 32).")] = ...,
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder.")] = ...,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
):
    """Write a quantized copy of a checkpoint (safetensors) that loads in seconds: pass it as --model."""
    from cpmgen.fileio import atomic_folder
    from cpmgen.loading import QUANTIZE
    from cpmgen.quantized_checkpoint import write_quantized

    if to not in QUANTIZE[1:]:
        raise UserError(f"--to {to}: choose {' or '.join(QUANTIZE[1:])}")
    settings = settings_from(config, sets, model=path)
    ckpt, args = _open_for_writing(settings)
    target = Path(output)
    if target.resolve() == ckpt.path.resolve():
        raise UserError(f"{output}: the output would overwrite the source checkpoint; choose another --output")
    with atomic_folder(target, force=force) as tmp, console.progress(f"quantizing to {to}", len(ckpt.names())) as advance:
        write_quantized(tmp, ckpt, args, to, advance)
    weights = target / "model.safetensors"
    if as_json:
        print_json({"source": str(ckpt.path), "output": str(target), "quantize": to, "bytes": weights.stat().st_size})
    else:
        console.stdout.print(f"wrote {target} ({to}, {_size(weights.stat().st_size)})")


# ----------------------------------------------------------------------------- text


@app.command()
def tokenize(
    text: Annotated[Optional[str], typer.Argument(help="Text to tokenize (or --file).", show_default=False)] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="Read the text from a UTF-8 file.", show_default=False)] = None,
    vocab: VocabOpt = None,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
):
    """Show the ids and pieces of a text, exactly as CPM-1 tokenizes it."""
    from cpmgen.fileio import read_text_utf8

    settings = settings_from(config, sets, model=model, vocab=vocab)
    if (text is None) == (file is None):
        raise UserError("tokenize: give either TEXT or --file FILE")
    content = read_text_utf8(file, "--file") if file is not None else text
    tokenizer = tokenizer_for(settings)
    ids = tokenizer.encode(content)
    result = {"ids": ids, "pieces": tokenizer.pieces(ids), "decoded": tokenizer.decode(ids)}
    if as_json:
        print_json(result)
    else:
        console.stdout.print(f"{len(ids)} tokens", markup=False)
        console.stdout.print(" ".join(f"{i}:{p}" for i, p in zip(ids, result["pieces"])), markup=False)


@app.command()
def score(
    file: Annotated[str, typer.Argument(help="UTF-8 text file to score ('-' for stdin).")],
    model: ModelOpt = None,
    vocab: VocabOpt = None,
    stride: StrideOpt = None,
    fast: Annotated[Optional[bool], typer.Option("--fast/--no-fast", help="One forward per window (fast) or per token (exact reference) [default: generate.fast].", show_default=False)] = None,
    keep: Annotated[Optional[int], typer.Option("--keep", help="The first N tokens stay at the start of the window through every slide.", show_default=False)] = None,
    report: Annotated[bool, typer.Option("--window-report", help="Also show perplexity by position: tokens 0..W, W..2W, ...")] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    mp: MpOpt = None,
):
    """Log-likelihood and perplexity of a text; longer texts slide the window by --stride, as generation does."""
    from cpmgen.fileio import read_text_utf8
    from cpmgen.score import score_ids, summary, window_report
    from cpmgen.window import Window

    settings = settings_from(config, sets, model=model, vocab=vocab, device=device, dtype=dtype, quantize=quantize)
    if stride is not None:
        settings.window.stride = stride
    if mp is not None:
        settings.runtime.mp = mp
    if keep is not None:
        settings.window.keep = keep
    text = sys.stdin.read() if file == "-" else read_text_utf8(file)
    loaded = load_for(settings, *model_parallel(settings))
    tokenizer = tokenizer_for(settings, loaded.args.vocab_size)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise UserError(f"{file}: the text has {len(ids)} token(s); scoring needs at least 2")
    window = Window.from_settings(settings.window, loaded.args.max_positions)
    with console.progress("scoring", total=len(ids) - 1) as advance:
        logprobs = score_ids(loaded.model, ids, window, settings.generate.fast if fast is None else fast, advance)
    result = summary(ids, logprobs)
    if report:
        result["window_report"] = window_report(logprobs, window.size)
    if as_json:
        print_json(result)
        return
    console.stdout.print(f"{len(ids)} tokens, nll {result['nll']:.4f}, perplexity {result['perplexity']:.2f}")
    if report:
        from rich.table import Table

        table = Table("tokens", "count", "nll", "perplexity", box=None)
        for bucket in result["window_report"]:
            table.add_row(f"{bucket['start']}..{bucket['end']}", str(bucket["tokens"]), f"{bucket['nll']:.4f}",
                          f"{bucket['perplexity']:.2f}")
        console.stdout.print(table)


# ----------------------------------------------------------------------------- generation

TASK_HELP = {
    "lyric": """Continue song lyrics: INPUT holds lines ending with <eod>; generated <eod> are line breaks.

    The window drops whole oldest lines (at least --stride tokens) when it is full, so the
    song goes on for as long as asked, token for token the same with --fast and --no-fast.""",
    "novel": """Continue a novel: INPUT pieces between <eod> are joined; a generated <eod> ends the story.

    Past the window (1023 tokens) the oldest --stride tokens are dropped and the rest is
    re-encoded once (fast path) or for every token (--no-fast); both give the same tokens.""",
}


def _task_command(task_name: str):
    def command(
        input: Annotated[Optional[str], typer.Argument(help="Prompt file, '-' for stdin; none on a terminal: interactive prompts.", show_default=False)] = None,
        model: ModelOpt = None,
        vocab: VocabOpt = None,
        config: ConfigOpt = None,
        sets: SetOpt = None,
        fast: Annotated[Optional[bool], typer.Option("--fast/--no-fast", help="KV cache with one re-encode per slide, or recompute the window per token [default: fast].", show_default=False)] = None,
        max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="New tokens per sample; 0: no limit [default: generate.max_new_tokens].", show_default=False)] = None,
        out_seq_length: Annotated[Optional[int], typer.Option("--out-seq-length", help="Total length, prompt + new tokens (older scripts' meaning).", show_default=False)] = None,
        temperature: Annotated[Optional[float], typer.Option("--temperature", help="[default: 0.9]", show_default=False)] = None,
        top_k: Annotated[Optional[int], typer.Option("--top-k", help="Keep the k most likely tokens; 0: off [default: 0].", show_default=False)] = None,
        top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling, in (0, 1] [default: 0.9].", show_default=False)] = None,
        repetition_penalty: Annotated[Optional[float], typer.Option("--repetition-penalty", help="CTRL penalty on tokens in the window; 1: off.", show_default=False)] = None,
        frequency_penalty: Annotated[Optional[float], typer.Option("--frequency-penalty", help="Subtract this times each token's count in the window from its logit.", show_default=False)] = None,
        presence_penalty: Annotated[Optional[float], typer.Option("--presence-penalty", help="Subtract this from the logit of every token present in the window.", show_default=False)] = None,
        greedy: Annotated[Optional[bool], typer.Option("--greedy", help="Always take the most likely token.", show_default=False)] = None,
        seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed; the same seed gives the same text.", show_default=False)] = None,
        stride: Annotated[Optional[int], typer.Option("--stride", help="Tokens dropped per window slide [default: a quarter of the window, 255]: each slide costs one re-encode of the window, so a larger stride is faster but keeps less context right after a slide; see README.", show_default=False)] = None,
        keep: Annotated[Optional[int], typer.Option("--keep", help="The first N prompt tokens (a title, the first line) stay at the start of the window through every slide.", show_default=False)] = None,
        stop: Annotated[Optional[list[str]], typer.Option("--stop", help="End a sample once its text contains TEXT (repeatable; kept in the text).", show_default=False)] = None,
        lines: Annotated[Optional[int], typer.Option("--lines", help="lyric: end after N generated lines.", show_default=False)] = None,
        num_samples: Annotated[Optional[int], typer.Option("--num-samples", help="Continuations generated together in one batch.", show_default=False)] = None,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        quantize: QuantizeOpt = None,
        compiled: CompileOpt = None,
        mp: MpOpt = None,
        as_json: Annotated[Optional[bool], typer.Option("--json", help="Print one JSON object (a list with --num-samples > 1).", show_default=False)] = None,
        output: Annotated[Optional[str], typer.Option("--output", "-o", help="Also write the text to FILE (atomically).", show_default=False)] = None,
    ):
        settings = settings_from(config, sets, task_name, model=model, vocab=vocab, device=device, dtype=dtype,
                                 quantize=quantize, compiled=compiled)
        for section, key, value in (
            ("generate", "fast", fast), ("generate", "max_new_tokens", max_new_tokens),
            ("generate", "out_seq_length", out_seq_length), ("generate", "num_samples", num_samples),
            ("generate", "json", as_json), ("generate", "output", output),
            ("sampling", "temperature", temperature), ("sampling", "top_k", top_k), ("sampling", "top_p", top_p),
            ("sampling", "repetition_penalty", repetition_penalty), ("sampling", "greedy", greedy),
            ("sampling", "frequency_penalty", frequency_penalty), ("sampling", "presence_penalty", presence_penalty),
            ("window", "keep", keep), ("generate", "stop", stop), ("generate", "lines", lines),
            ("sampling", "seed", seed), ("window", "stride", stride), ("runtime", "mp", mp),
        ):
            if value is not None:
                setattr(getattr(settings, section), key, value)
        _run_task(task_name, input, settings)

    command.__doc__ = TASK_HELP[task_name]
    command.__name__ = task_name
    app.command(task_name)(command)


def _run_task(task_name: str, input: Optional[str], settings: Settings) -> None:
    from cpmgen.display import full_text, make_view
    from cpmgen.fileio import read_text_utf8, write_text_atomic
    from cpmgen.runner import Job, run
    from cpmgen.tasks import TASKS
    from cpmgen.window import Window

    gen, samp = settings.generate, settings.sampling
    for option, value in (("--max-new-tokens", gen.max_new_tokens), ("--out-seq-length", gen.out_seq_length)):
        if value is not None and value < 0:
            raise UserError(f"{option} {value}: must not be negative")
    if gen.num_samples < 1:
        raise UserError(f"--num-samples {gen.num_samples}: must be at least 1")
    samp.validate()  # values may have come from YAML or --set since it was made
    if gen.lines is not None and (task_name != "lyric" or gen.lines < 1):
        raise UserError(f"--lines {gen.lines}: only lyric has lines, and it needs at least 1" if task_name == "lyric"
                        else "--lines: only lyric counts lines; use --max-new-tokens or --stop for novel")
    if any(not s for s in gen.stop):
        raise UserError("--stop '': a stop text must not be empty")
    interactive = input is None
    rank, world = model_parallel(settings)
    if rank == 0:  # the other ranks receive rank 0's prompts
        if interactive and not sys.stdin.isatty():
            raise UserError(f"{task_name}: give an INPUT file, or '-' to read the prompt from stdin")
        texts = _interactive_prompts() if interactive else iter([sys.stdin.read() if input == "-" else read_text_utf8(input)])
    task = TASKS[task_name]
    loaded = load_for(settings, rank, world)
    tokenizer = tokenizer_for(settings, loaded.args.vocab_size)
    window = Window.from_settings(settings.window, loaded.args.max_positions, tokenizer.eod_id if task.lines else None)
    if world > 1:
        from cpmgen.parallel import any_rank, shared_items

        prompts, agree = shared_items(texts if rank == 0 else None), any_rank
    else:
        prompts, agree = texts, bool
    for text in prompts:
        prompt_ids = task.prompt_ids(text, tokenizer)
        if not prompt_ids:
            where = "stdin" if input in (None, "-") else input
            if interactive:
                console.stderr.print("empty prompt; type some text, or stop to quit")
                continue
            raise UserError(f"{where}: the prompt is empty; write the opening text (lyric: lines ending with <eod>)")
        if window.keep > len(prompt_ids):
            raise UserError(f"--keep {window.keep}: the prompt has only {len(prompt_ids)} tokens; keep at most that many")
        if len(prompt_ids) > window.size:
            console.warn(f"the prompt has {len(prompt_ids)} tokens, more than the {window.size}-token window; "
                         "keeping its last part")
        max_new = gen.max_new_tokens
        if gen.out_seq_length is not None:
            max_new = gen.out_seq_length - len(prompt_ids)
            if max_new < 1:
                raise UserError(f"--out-seq-length {gen.out_seq_length}: not longer than the prompt "
                                f"({len(prompt_ids)} tokens); ask for more, or use --max-new-tokens")
        job = Job(task, window, samp, max_new or None, gen.num_samples, gen.fast, samp.seed, tuple(gen.stop),
                  gen.lines)
        prompt_text = tokenizer.decode(task.display_ids(prompt_ids, tokenizer.eod_id))
        view = make_view(gen.json or rank != 0, console.stdout, prompt_text, job.num_samples)
        result = run(job, loaded.model, tokenizer, prompt_ids, view, agree)
        view.finish(prompt_text, result.texts, result.stats)
        if gen.json:
            objects = result.as_json(task_name)
            print_json(objects[0] if len(objects) == 1 else objects)
        if gen.output and rank == 0:
            write_text_atomic(gen.output, full_text(prompt_text, result.texts))
        if result.interrupted:
            raise typer.Exit(130)


def _interactive_prompts():
    """The older scripts' prompt loop: empty input refused, `stop` or Ctrl-D ends it."""
    while True:
        try:
            text = console.stderr.input("[bold]prompt[/bold] (stop to quit) >>> ")
        except EOFError:
            return
        if text.strip() == "stop":
            return
        yield text.replace("\\n", "\n")


for _name in TASK_HELP:
    _task_command(_name)


def main() -> None:
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["CPMGEN_DEBUG"] = "1"  # model-parallel ranks inherit it
    debug = os.environ.get("CPMGEN_DEBUG") == "1"
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UserError as e:
        if debug:
            raise
        sys.stderr.write(f"error: {e}\n")
        code = e.exit_code
    except Exception as e:  # noqa: BLE001 - a rank's crash (e.g. out of memory) as one line, not a traceback per rank
        if debug or "RANK" not in os.environ:
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        sys.stderr.write(f"error: rank {os.environ['RANK']}: {type(e).__name__}: {reason}\n")
        code = 1
    if "RANK" in os.environ:
        from cpmgen.parallel import shutdown

        shutdown(code)
    sys.exit(code)
