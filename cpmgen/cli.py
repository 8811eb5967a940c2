"""The `cpmgen` command. Each subcommand is a typed function whose docstring is its --help.

Bad input raises UserError anywhere below; `main` prints it on one line and exits 2 (no
traceback unless --debug or CPMGEN_DEBUG=1).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from cpmgen import console
from cpmgen.config import OPTION_KEYS, Settings, apply_options, default_settings, load_settings
from cpmgen.errors import UserError
from cpmgen.tasks import TASKS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich",
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Run CPM-1 to write lyrics and novels of unlimited length, exactly and fast.")

# Help panels, in the order --help shows them.
INPUT, GENERATION, SAMPLING, WINDOW, RUNTIME, OUTPUT = (
    "Input", "Generation", "Sampling", "Window", "Model & runtime", "Output")


def option(*decls: str, help: str, panel: str, default: Optional[object] = None, metavar: Optional[str] = None):
    """A typer.Option in a help panel, its help plain text (no rich markup) with `[default: X]`
    when there is one to show."""
    text = escape(help) + (f" \\[default: {escape(str(default))}]" if default is not None else "")
    return typer.Option(*decls, help=text, rich_help_panel=panel, show_default=False, metavar=metavar)


def help_defaults(task: Optional[str] = None) -> Settings:
    """The settings a run would start from (defaults, task defaults, config files, environment),
    for the defaults --help shows; the built-in ones when a config file is broken (the run
    itself then reports it)."""
    try:
        return load_settings(None, None, task)
    except UserError:
        return default_settings(task)


_ROOT = help_defaults()

# Options shared by the commands, declared once.
ModelOpt = Annotated[Optional[str], option("--model", "-m", metavar="DIR", panel=RUNTIME,
                                           help="Model folder (Megatron or HF format).",
                                           default=_ROOT.model.path or "model.path in a config, or $CPMGEN_MODEL")]
VocabOpt = Annotated[Optional[str], option("--vocab", metavar="FILE", panel=RUNTIME,
                                           help="chinese_vocab.model.", default="in or beside the model folder")]
ConfigOpt = Annotated[Optional[str], option("--config", "-c", metavar="FILE", panel=INPUT,
                                            help="YAML config file (sections model, tokenizer, runtime, window, sampling, generate), over the user config and $CPMGEN_CONFIG.")]
SetOpt = Annotated[Optional[list[str]], option("--set", metavar="KEY=VALUE", panel=INPUT,
                                               help="Override a config key, e.g. --set window.size=64 (repeatable).")]
DeviceOpt = Annotated[Optional[str], option("--device", metavar="auto|cpu|cuda", panel=RUNTIME, help="Where to run.",
                                            default=f"{_ROOT.runtime.device}: cuda when there is one")]
DtypeOpt = Annotated[Optional[str], option("--dtype", metavar="auto|fp32|bf16|fp16", panel=RUNTIME,
                                           help="Weight type; float32, bfloat16 and float16 are accepted too.",
                                           default=f"{_ROOT.runtime.dtype}: fp32 on CPU, bf16 or fp16 on GPU")]
QuantizeOpt = Annotated[Optional[str], option("--quantize", metavar="none|int8|int4", panel=RUNTIME,
                                              help="int8 or int4 weights: about 4x or 7x less weight memory to read per token than fp32.",
                                              default=_ROOT.runtime.quantize)]
KvCacheOpt = Annotated[Optional[str], option("--kv-cache-dtype", metavar="auto|fp32|bf16|fp16", panel=RUNTIME,
                                             help="The keys and values kept for each token: bf16 halves what a step reads from a long context (fp16: GPU).",
                                             default=f"{_ROOT.runtime.kv_cache_dtype}: the weights' dtype, bf16 with --quantize")]
CompileOpt = Annotated[Optional[bool], option("--compile/--no-compile", metavar="", panel=RUNTIME,
                                              help="torch.compile the decode step (a CUDA graph on GPU) after a one-time compile of tens of seconds; on CPU the default prepacked linears are faster.",
                                              default="on" if _ROOT.runtime.compile else "off")]
JsonOpt = Annotated[bool, option("--json", metavar="", panel=OUTPUT, help="Print one JSON object for scripts.")]
MpOpt = Annotated[Optional[int], option("--mp", metavar="N", panel=RUNTIME,
                                        help="Model-parallel ranks: relaunches through torchrun with N local ranks (gloo on CPU, NCCL on GPU).",
                                        default=_ROOT.runtime.mp or 1)]
StrideOpt = Annotated[Optional[int], option("--stride", metavar="N", panel=WINDOW,
                                            help="Tokens dropped when the window is full: each move costs one re-encode of the window, so a larger stride is faster but keeps less context right after a move.",
                                            default=_ROOT.window.stride or "a quarter of the window")]
KeepOpt = Annotated[Optional[int], option("--keep", metavar="N", panel=WINDOW,
                                          help="The first N prompt tokens (a title, the first line) stay at the start of the window through every move.",
                                          default=_ROOT.window.keep)]
PathArg = Annotated[Optional[str], typer.Argument(help="Checkpoint folder (or -m/--model DIR).", metavar="DIR",
                                                  show_default=False)]


def examples(*lines: str) -> str:
    """An Examples block for a command's --help (lines kept as written)."""
    return "Examples:\n\n" + "\n".join(f"  {escape(line)}" for line in lines)


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.stdout.print(f"cpmgen {version('cpmgen')}", markup=False)
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", help="Show the version and exit.", is_eager=True, metavar="",
                                                callback=_show_version)] = False):
    """Run CPM-1 to write lyrics and novels of unlimited length, exactly and fast."""


def model_folder(path: Optional[str], model: Optional[str]) -> Optional[str]:
    """The model folder named as DIR or with -m/--model (the same everywhere)."""
    if path is not None and model is not None and path != model:
        raise UserError(f"the model folder is given twice ({path} and --model {model}); give it once")
    return model if model is not None else path


TrustOpt = Annotated[Optional[bool], option("--trust-checkpoint", metavar="", panel=RUNTIME,
                                 help="Load rank files that pickle Python objects beyond tensors, args and RNG states: this can run code from the file, so only for a file you wrote yourself.")]
ThreadsOpt = Annotated[Optional[int], option("--threads", "-t", metavar="N", panel=RUNTIME,
                                             help="CPU threads per process; 0: the cores this process may use, shared among the local ranks of a launcher.",
                                             default=_ROOT.runtime.threads or "0: automatic")]


def command_settings(options: dict, task: Optional[str] = None) -> Settings:
    """A command's settings: config files and --set, then its own options (its parameters that
    config.OPTION_KEYS names; None: not given), checked as a whole."""
    settings = load_settings(options.get("config"), options.get("sets"), task)
    apply_options(settings, {name: value for name, value in options.items() if name in OPTION_KEYS})
    settings.validate(task)
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
    if not parallel.launched():
        from cpmgen.checkpoint.reader import resolve_args
        from cpmgen.checkpoint.splits import check_split
        from cpmgen.loading import open_model

        # Fail here, once, on what every rank would fail on; opening is cheap (memory-mapped).
        ckpt = open_model(settings)
        check_split(resolve_args(ckpt, settings.model), world, ckpt.path)
        raise typer.Exit(parallel.launch(world, sys.argv[1:], os.environ.get("CPMGEN_DEBUG") == "1"))
    rank, world = parallel.init(resolve_device(settings.runtime.device).type)
    if rank != 0:
        console.silence()
    return rank, world


def load_engine(settings: Settings, rank: int = 0, world: int = 1):
    """The engine on the model (this rank's shard under --mp) and its vocab, under a progress
    bar that names the model folder."""
    from cpmgen.engine import Engine

    return Engine(settings, rank, world, progress=console.progress)


# ----------------------------------------------------------------------------- checkpoints


@app.command("inspect-ckpt", epilog=examples("cpmgen inspect-ckpt models/cpm-tiny",
                                             "cpmgen inspect-ckpt -m models/cpm-tiny --check-values --json"))
def inspect_ckpt(
    path: PathArg = None,
    model: ModelOpt = None,
    check_values: Annotated[bool, option("--check-values", metavar="", panel=INPUT, help="Also scan every tensor for NaN/Inf.")] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    trust: TrustOpt = None,
):
    """Show what a checkpoint folder holds and what is wrong with it.

    Exit 0 when sound, 1 when problems are found, 2 when the folder is unusable."""
    from cpmgen.inspection import inspect_checkpoint
    from cpmgen.loading import model_path

    settings = command_settings(dict(locals(), model=model_folder(path, model)))
    report = inspect_checkpoint(model_path(settings), settings.model.num_heads, check_values,
                                settings.model.trust_checkpoint)
    if as_json:
        print_json(report)
    else:
        _print_report(report)
    raise typer.Exit(1 if report["problems"] else 0)


def _print_report(report: dict) -> None:
    from rich.table import Table

    out = console.stdout
    facts = [f"format {report['format']}"]
    if report["iteration"] is not None:  # an HF folder has no training iteration
        facts.append(f"iteration {report['iteration']}")
    facts.append(f"model-parallel size {report['mp']}")
    out.print(f"[bold]{escape(str(report['path']))}[/bold]  {', '.join(facts)}")
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
    from cpmgen.checkpoint.reader import resolve_args
    from cpmgen.loading import open_model

    ckpt = open_model(settings)
    if ckpt.format == "quantized":
        raise UserError(f"{ckpt.path}: a quantized folder cannot be resharded, converted or quantized again; "
                        "use the checkpoint it was made from")
    return ckpt, resolve_args(ckpt, settings.model)


def _output_folder(ckpt, output: Path, force: bool, files: int):
    """The checked, locked temporary folder for a checkpoint written from `ckpt` in `files` files."""
    from cpmgen.fileio import atomic_folder, check_space

    folder = atomic_folder(output, force=force, protect=[ckpt.path, *ckpt.files])
    check_space(output, ckpt.nbytes(), ckpt.nbytes() // files)
    return folder


def _write_megatron_folder(ckpt, args, mp: int, output: Path, force: bool) -> None:
    from cpmgen.checkpoint.splits import check_split
    from cpmgen.checkpoint.writer import write_megatron

    check_split(args, mp, ckpt.path)  # before anything is written
    with _output_folder(ckpt, output, force, mp) as tmp, \
            console.progress(f"writing mp={mp}", len(ckpt.names()) * mp) as advance:
        write_megatron(tmp, ckpt, args, mp, advance)


@app.command(epilog=examples("cpmgen reshard models/cpm-tiny --mp 2            # writes models/cpm-tiny_MP2",
                             "cpmgen reshard -m models/cpm-tiny_MP2 --mp 4 -o tiny-mp4"))
def reshard(
    path: PathArg = None,
    model: ModelOpt = None,
    target_mp: Annotated[int, option("--mp", metavar="N", panel=INPUT, help="Target model-parallel size: any N dividing heads, hidden and vocab.")] = ...,
    output_dir: Annotated[Optional[str], option("--output", "-o", metavar="DIR", panel=OUTPUT, help="Output folder.", default="DIR_MP<N> beside DIR")] = None,
    force: Annotated[bool, option("--force", metavar="", panel=OUTPUT, help="Replace an existing output folder.")] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    trust: TrustOpt = None,
):
    """Split or merge a checkpoint to another model-parallel size (any N that divides the split dimensions).

    The source is never touched; the output is written to a temporary folder and renamed
    into place, keeping the iteration and RNG states and setting mp_world_size."""
    settings = command_settings(dict(locals(), model=model_folder(path, model)))
    ckpt, args = _open_for_writing(settings)
    source = ckpt.path.resolve()
    target = Path(output_dir) if output_dir else source.parent / f"{source.name}_MP{target_mp}"
    _write_megatron_folder(ckpt, args, target_mp, target, force)
    result = {"source": str(ckpt.path), "source_mp": ckpt.mp, "output": str(target), "mp": target_mp,
              "files": sorted(str(p) for p in target.rglob("mp_rank_*.pt"))}
    if as_json:
        print_json(result)
    else:
        console.stdout.print(f"wrote {target} (model-parallel size {ckpt.mp} -> {target_mp}, {target_mp} rank file(s))")


@app.command(epilog=examples("cpmgen convert models/cpm-tiny --to hf -o tiny-hf",
                             "cpmgen convert -m tiny-hf --to megatron --mp 2 -o tiny-mp2"))
def convert(
    path: PathArg = None,
    model: ModelOpt = None,
    to: Annotated[str, option("--to", metavar="hf|megatron", panel=OUTPUT, help="Target format.")] = ...,
    output_dir: Annotated[str, option("--output", "-o", metavar="DIR", panel=OUTPUT, help="Output folder.")] = ...,
    target_mp: Annotated[int, option("--mp", metavar="N", panel=OUTPUT, help="Model-parallel size of a megatron output.", default=1)] = 1,
    vocab: VocabOpt = None,
    force: Annotated[bool, option("--force", metavar="", panel=OUTPUT, help="Replace an existing output folder.")] = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    trust: TrustOpt = None,
):
    """Export to an HF GPT2LMHeadModel folder (config.json, model.safetensors, spiece.model), or back to Megatron."""
    from cpmgen.checkpoint.hf import write_hf
    from cpmgen.tokenizer import find_vocab

    settings = command_settings(dict(locals(), model=model_folder(path, model)))
    ckpt, args = _open_for_writing(settings)
    target = Path(output_dir)
    if to == "megatron":
        _write_megatron_folder(ckpt, args, target_mp, target, force)
    elif to == "hf":
        try:
            vocab_path = find_vocab(None, settings.tokenizer.vocab, settings.model.path)
        except UserError:
            if settings.tokenizer.vocab:
                raise
            vocab_path = None
            console.warn("no chinese_vocab.model found: the HF folder will have no spiece.model (pass --vocab)")
        with _output_folder(ckpt, target, force, 1) as tmp, \
                console.progress("writing hf", len(ckpt.names()) + 1) as advance:
            tensors = {}
            for name, tensor in ckpt.full_tensors():
                tensors[name] = tensor
                advance(1)
            write_hf(tmp, tensors, args, vocab_path)
            advance(1)
    else:
        raise UserError(f"--to {to}: choose hf or megatron")
    console.stdout.print(f"wrote {target} ({to})")


@app.command("quantize", epilog=examples("cpmgen quantize models/cpm-tiny --to int8 -o tiny-int8",
                                          "cpmgen novel -m tiny-int8 -p 今天天气很好"))
def quantize_command(
    path: PathArg = None,
    model: ModelOpt = None,
    to: Annotated[str, option("--to", metavar="int8|int4", panel=OUTPUT, help="int8, or int4 (4-bit weights in groups of 32).")] = ...,
    output_dir: Annotated[str, option("--output", "-o", metavar="DIR", panel=OUTPUT, help="Output folder.")] = ...,
    force: Annotated[bool, option("--force", metavar="", panel=OUTPUT, help="Replace an existing output folder.")] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    trust: TrustOpt = None,
):
    """Write a quantized copy of a checkpoint (safetensors) that loads in seconds: pass it as --model."""
    from cpmgen.config import QUANTIZE
    from cpmgen.fileio import atomic_folder, check_space
    from cpmgen.quantized_checkpoint import quantized_bytes, write_quantized

    if to not in QUANTIZE[1:]:
        raise UserError(f"--to {to}: choose {' or '.join(QUANTIZE[1:])}")
    settings = command_settings(dict(locals(), model=model_folder(path, model)))
    ckpt, args = _open_for_writing(settings)
    target = Path(output_dir)
    folder = atomic_folder(target, force=force, protect=[ckpt.path, *ckpt.files])
    check_space(target, quantized_bytes(ckpt, to), quantized_bytes(ckpt, to))  # one file
    with folder as tmp, console.progress(f"quantizing to {to}", len(ckpt.names())) as advance:
        write_quantized(tmp, ckpt, args, to, advance)
    written = target / "model.safetensors"
    if as_json:
        print_json({"source": str(ckpt.path), "output": str(target), "quantize": to, "bytes": written.stat().st_size})
    else:
        console.stdout.print(f"wrote {target} ({to}, {_size(written.stat().st_size)})")


# ----------------------------------------------------------------------------- text


@app.command(epilog=examples('cpmgen tokenize -m models/cpm-tiny "新年快乐"',
                             "cpmgen tokenize --vocab chinese_vocab.model -f text.txt --json"))
def tokenize(
    text: Annotated[Optional[str], typer.Argument(help="Text to tokenize (or --file).", metavar="TEXT", show_default=False)] = None,
    file: Annotated[Optional[str], option("--file", "-f", metavar="FILE", panel=INPUT, help="Read the text from a UTF-8 file.")] = None,
    vocab: VocabOpt = None,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
):
    """Show the ids and pieces of a text, exactly as CPM-1 tokenizes it."""
    from cpmgen.engine import open_tokenizer
    from cpmgen.fileio import read_text_utf8

    settings = command_settings(locals())
    if (text is None) == (file is None):
        raise UserError("tokenize: give either TEXT or --file FILE")
    content = read_text_utf8(file, "--file") if file is not None else text
    tokenizer = open_tokenizer(settings)
    ids = tokenizer.encode(content)
    result = {"ids": ids, "pieces": tokenizer.pieces(ids), "decoded": tokenizer.decode(ids)}
    if as_json:
        print_json(result)
    else:
        console.stdout.print(f"{len(ids)} tokens", markup=False)
        console.stdout.print(" ".join(f"{i}:{p}" for i, p in zip(ids, result["pieces"])), markup=False)


@app.command(epilog=examples("cpmgen score models/cpm-tiny/heldout.txt -m models/cpm-tiny --window-report",
                             "cat text.txt | cpmgen score - --stride 32 --json"))
def score(
    file: Annotated[str, typer.Argument(help="UTF-8 text file to score ('-' for stdin).", metavar="FILE")],
    model: ModelOpt = None,
    vocab: VocabOpt = None,
    stride: StrideOpt = None,
    fast: Annotated[Optional[bool], option("--fast/--no-fast", metavar="", panel=WINDOW, help="One forward per window (fast) or per token (the exact reference).", default="fast")] = None,
    keep: KeepOpt = None,
    report: Annotated[bool, option("--window-report", metavar="", panel=OUTPUT, help="Also show perplexity by position: tokens 0..W, W..2W, ...")] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    kv_cache_dtype: KvCacheOpt = None,
    mp: MpOpt = None,
    threads: ThreadsOpt = None,
    trust: TrustOpt = None,
):
    """Log-likelihood and perplexity of a text; longer texts slide the window by --stride, as generation does."""
    from cpmgen.engine import TextError

    settings = command_settings(locals())
    rank, world = model_parallel(settings)
    text = _input_text(file, rank, world)
    engine = load_engine(settings, rank, world)
    try:
        result = engine.score(text, progress=console.progress, window_report=report)
    except TextError as e:
        raise UserError(f"{file}: {e}") from None
    if as_json:
        print_json(result)
        return
    console.stdout.print(f"{len(result['ids'])} tokens, nll {result['nll']:.4f}, perplexity {result['perplexity']:.2f}")
    if report:
        from rich.table import Table

        table = Table("tokens", "count", "nll", "perplexity", box=None)
        for bucket in result["window_report"]:
            table.add_row(f"{bucket['start']}..{bucket['end']}", str(bucket["tokens"]), f"{bucket['nll']:.4f}",
                          f"{bucket['perplexity']:.2f}")
        console.stdout.print(table)


# ----------------------------------------------------------------------------- generation

def _task_command(task_name: str):
    task = TASKS[task_name]
    d = help_defaults(task_name)
    gen, samp = d.generate, d.sampling

    def command(
        input: Annotated[Optional[str], typer.Argument(help="Prompt file; '-' or piped text: stdin; none on a terminal: a prompt loop.", metavar="FILE", show_default=False)] = None,
        prompt: Annotated[Optional[str], option("--prompt", "-p", metavar="TEXT", panel=INPUT, help="The prompt text itself, instead of FILE.")] = None,
        config: ConfigOpt = None,
        sets: SetOpt = None,
        max_new_tokens: Annotated[Optional[int], option("--max-new-tokens", "-n", metavar="N", panel=GENERATION, help="New tokens per sample; 0: no limit.", default=gen.max_new_tokens)] = None,
        min_new_tokens: Annotated[Optional[int], option("--min-new-tokens", metavar="N", panel=GENERATION, help="An end of text among the first N new tokens does not end the story (it stays in the window, as with --ignore-eos).", default=gen.min_new_tokens)] = None,
        ignore_eos: Annotated[Optional[bool], option("--ignore-eos", metavar="", panel=GENERATION, help="Write on past the model's end of text: the <eod> token stays in the window (the model starts a new text, as between two training articles) and shows as a line break.")] = None,
        out_seq_length: Annotated[Optional[int], option("--out-seq-length", metavar="N", panel=GENERATION, help="Total length, prompt + new tokens (the older scripts' meaning); instead of --max-new-tokens.")] = None,
        lines: Annotated[Optional[int], option("--lines", metavar="N", panel=GENERATION, help="End once the new text shows N line breaks (every line you see counts, <eod> or not).")] = None,
        stop: Annotated[Optional[list[str]], option("--stop", metavar="TEXT", panel=GENERATION, help="End a sample once its text contains TEXT (repeatable; kept in the text).")] = None,
        num_samples: Annotated[Optional[int], option("--num-samples", metavar="N", panel=GENERATION, help="Continuations generated together in one batch; the k-th draws from seed S + k - 1, so it is the single run with that --seed.", default=gen.num_samples)] = None,
        fast: Annotated[Optional[bool], option("--fast/--no-fast", metavar="", panel=GENERATION, help="KV cache with one re-encode per window move, or recompute the window for every token (the older scripts' rule; same tokens, much slower).", default="fast" if gen.fast else "no-fast")] = None,
        temperature: Annotated[Optional[float], option("--temperature", metavar="T", panel=SAMPLING, help="Divide the logits by T: lower is safer, higher more varied; 0: greedy.", default=samp.temperature)] = None,
        top_k: Annotated[Optional[int], option("--top-k", metavar="K", panel=SAMPLING, help="Keep the K most likely tokens; 0: off.", default=samp.top_k)] = None,
        top_p: Annotated[Optional[float], option("--top-p", metavar="P", panel=SAMPLING, help="Nucleus sampling: keep the most likely tokens up to probability P, in (0, 1]; 1: off.", default=samp.top_p)] = None,
        greedy: Annotated[Optional[bool], option("--greedy", metavar="", panel=SAMPLING, help="Always take the most likely token (same as --temperature 0).")] = None,
        repetition_penalty: Annotated[Optional[float], option("--repetition-penalty", metavar="X", panel=SAMPLING, help="CTRL penalty on tokens in the window; 1: off.", default=samp.repetition_penalty)] = None,
        frequency_penalty: Annotated[Optional[float], option("--frequency-penalty", metavar="X", panel=SAMPLING, help="Subtract X times each token's count in the window from its logit.", default=samp.frequency_penalty)] = None,
        presence_penalty: Annotated[Optional[float], option("--presence-penalty", metavar="X", panel=SAMPLING, help="Subtract X from the logit of every token present in the window.", default=samp.presence_penalty)] = None,
        seed: Annotated[Optional[int], option("--seed", "-s", metavar="S", panel=SAMPLING, help="Random seed: the same seed gives the same text.", default=samp.seed if samp.seed is not None else "random, shown by --json")] = None,
        stride: StrideOpt = None,
        keep: KeepOpt = None,
        model: ModelOpt = None,
        vocab: VocabOpt = None,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        quantize: QuantizeOpt = None,
        kv_cache_dtype: KvCacheOpt = None,
        compiled: CompileOpt = None,
        mp: MpOpt = None,
        threads: ThreadsOpt = None,
        trust: TrustOpt = None,
        as_json: Annotated[Optional[bool], option("--json", metavar="", panel=OUTPUT, help="Print one JSON object (a list with --num-samples > 1).")] = None,
        output: Annotated[Optional[str], option("--output", "-o", metavar="FILE", panel=OUTPUT, help="Also write the text to FILE (checked before the work; it holds the text so far however the run stops).")] = None,
        force: Annotated[Optional[bool], option("--force", metavar="", panel=OUTPUT, help="Replace an existing --output file.")] = None,
    ):
        _run_task(task_name, input, prompt, command_settings(locals(), task_name))

    # the annotations name this task's defaults (gen, samp): evaluate them here, once
    signature = inspect.signature(command, eval_str=True, locals={"gen": gen, "samp": samp})
    others = {name for other in TASKS.values() if other is not task for name in other.own_options}
    command.__signature__ = signature.replace(parameters=[p for p in signature.parameters.values() if p.name not in others])
    command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
    command.__doc__ = task.help
    command.__name__ = task_name
    app.command(task_name, epilog=examples(*task.examples))(command)


def _run_task(task_name: str, input: Optional[str], prompt: Optional[str], settings: Settings) -> None:
    from cpmgen.fileio import TextOutput

    gen = settings.generate
    if prompt is not None and input is not None:
        raise UserError(f"{input}: give the prompt either as FILE or with -p/--prompt, not both")
    # checked before the work (and before a model-parallel launch); rank 0 holds it to the end
    output = TextOutput(gen.output, gen.force, [input] if input not in (None, "-") else []) if gen.output else None
    rank, world = model_parallel(settings)
    if rank != 0:
        output = None
    with output or contextlib.nullcontext():
        _generate_texts(task_name, input, prompt, settings, rank, world, output)


def _generate_texts(task_name: str, input: Optional[str], prompt: Optional[str], settings: Settings, rank: int,
                    world: int, output) -> None:
    from cpmgen.display import SavedView, make_view
    from cpmgen.engine import TextError

    gen = settings.generate
    terminal = _Terminal(task_name, quit_on_interrupt=world > 1)
    prompts = _prompts(input, prompt, terminal, rank, world)
    # the other ranks receive rank 0's prompts (their stdin is not the user's)
    interactive = input is None and prompt is None and (rank != 0 or sys.stdin.isatty())
    where = "--prompt" if prompt is not None else "stdin" if input in (None, "-") else input
    engine = load_engine(settings, rank, world)
    if world > 1:
        from cpmgen.parallel import any_rank as agree
    else:
        agree = bool
    for text in prompts:
        try:
            job, prompt_ids = engine.prepare(text, task_name)
        except TextError as e:
            if interactive:
                console.stderr.print("empty prompt; type some text, or Ctrl-D to quit")
                continue
            raise UserError(f"{where}: {e}") from None
        if len(prompt_ids) > job.window.size:
            console.warn(f"the prompt has {len(prompt_ids)} tokens, more than the {job.window.size}-token window; "
                         "keeping its last part")
        prompt_text = job.task.prompt_text(text)
        view = make_view(gen.json or rank != 0, console.stdout, prompt_text, job.num_samples,
                         limit=job.max_new_tokens, lines=job.max_lines)
        if output is not None:
            view = SavedView(view, output, prompt_text, job.num_samples)
        try:
            result = engine.run(job, prompt_ids, view, agree)
            view.finish(prompt_text, result.texts, result.stats, result.stop_reasons)
        finally:
            if output is not None:  # also when the run failed: the text so far is kept
                view.save()
        if gen.json:
            objects = result.as_json(task_name)
            print_json(objects[0] if len(objects) == 1 else objects)
        if result.interrupted and not interactive:
            raise typer.Exit(130)
    if terminal.interrupted:
        raise typer.Exit(130)


def _prompts(input: Optional[str], prompt: Optional[str], terminal: "_Terminal", rank: int, world: int):
    """The prompt texts: -p TEXT, the INPUT file, stdin ('-', or piped without it), or the
    prompt loop on a terminal. Under model parallel every rank gets the same ones, whichever
    machine holds them: INPUT is read on every machine that has it, and the copies must agree;
    piped stdin and interactive prompts come from rank 0."""
    if prompt is not None:
        return iter([prompt])
    if input is not None:
        return iter([_input_text(input, rank, world)])
    if world == 1:
        return iter(terminal) if sys.stdin.isatty() else iter([sys.stdin.read()])
    from cpmgen import parallel

    own = (iter(terminal) if sys.stdin.isatty() else iter([sys.stdin.read()])) if rank == 0 else None
    return parallel.shared_items(own)


def _input_text(input: str, rank: int, world: int) -> str:
    """The text of INPUT ('-': stdin). Under model parallel it is read on every machine that
    has it (the copies must agree), so that it need not be on the machine of rank 0."""
    from cpmgen.fileio import read_text_utf8

    missing = f"{input}: input file not found; to give the prompt text itself, use -p/--prompt TEXT"
    if world == 1:
        if input == "-":
            return sys.stdin.read()
        if not Path(input).exists():
            raise UserError(missing)
        return read_text_utf8(input)
    from cpmgen.parallel import agreed_text

    if input == "-":
        # one reader per machine; a terminal only on rank 0, where a user may be typing the text
        reads = os.environ.get("LOCAL_RANK", "0") == "0" and (rank == 0 or not sys.stdin.isatty())
        return agreed_text(lambda: (sys.stdin.read() or None) if reads else None) or ""
    return agreed_text(lambda: read_text_utf8(input) if Path(input).exists() else None, missing)


class _Terminal:
    """The prompt loop on a terminal. Ctrl-C while writing stops that text and comes back here;
    Ctrl-D, `stop`, or Ctrl-C twice at the prompt quits (under model parallel, once: the
    launcher passes it on to every rank). A typed \\n is a line break (lyric: a new line, as <eod>)."""

    def __init__(self, task_name: str, quit_on_interrupt: bool = False):
        self.task_name, self.quit_on_interrupt = task_name, quit_on_interrupt
        self.interrupted = False  # quit with Ctrl-C under model parallel: exit 130

    def __iter__(self):
        line_break = "<eod>" if self.task_name == "lyric" else "\n"
        pressed = False
        while True:
            try:
                text = console.stderr.input(TASKS[self.task_name].prompt_hint)
            except EOFError:
                return
            except KeyboardInterrupt:
                if self.quit_on_interrupt:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun passes the Ctrl-C on to its ranks once more
                    console.stderr.print()
                    self.interrupted = True
                    return
                if pressed:
                    console.stderr.print()
                    return
                pressed = True
                console.stderr.print("\n(Ctrl-C again or Ctrl-D to quit)")
                continue
            pressed = False
            if text.strip() == "stop":
                return
            yield text.replace("\\n", line_break)


for _name in TASKS:
    _task_command(_name)


# ----------------------------------------------------------------------------- serving


@app.command()
def serve(
    model: ModelOpt = None,
    vocab: VocabOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 127.0.0.1 serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Requests generated together in one batch.")] = 4,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests waiting for a batch row; more get 429.")] = 16,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="CPMGEN_API_KEY", help="Require Authorization: Bearer KEY on /v1 and /metrics [default: $CPMGEN_API_KEY, none].", show_default=False)] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens a request may ask for; 0: no limit (a request may generate until it is stopped).")] = 0,
    max_prompt_chars: Annotated[int, typer.Option("--max-prompt-chars", help="Longest prompt accepted, in characters.")] = 100_000,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    kv_cache_dtype: KvCacheOpt = None,
    compiled: CompileOpt = None,
    threads: ThreadsOpt = None,
    trust: TrustOpt = None,
):
    """Serve the model over HTTP: OpenAI-style /v1/completions (streamed or not) and a writing page at /.

    Requests join and leave one running batch between decode steps; each has its own window
    and seed and gets the tokens that `cpmgen novel`/`lyric` gives for the same settings."""
    try:
        from cpmgen.serve.app import Limits, serve as run_server
    except ImportError as e:
        raise UserError(f"serve needs the serving packages ({e.name} is missing): pip install -e '.[serve]'") from None
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: must be between 1 and 65535")
    for option, value, least in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0),
                                 ("--max-tokens", max_tokens, 0), ("--max-prompt-chars", max_prompt_chars, 1)):
        if value < least:
            raise UserError(f"{option} {value}: must be at least {least}")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key '': the key must not be empty")
    import socket

    with socket.socket() as probe:  # before the model loads: a taken port fails in a second, not after
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                            "choose another --port") from None
    settings = command_settings(locals())
    engine = load_engine(settings)
    run_server(engine, host, port, max_batch, max_queue, Limits(max_tokens=max_tokens, max_prompt_chars=max_prompt_chars),
               api_key, Path(settings.model.path).name)


# The launchers' own argument: the DeepSpeed launcher passes --local_rank=N, torch.distributed.launch
# --local-rank=N; LOCAL_RANK in the environment says the same.
LOCAL_RANK_ARG = re.compile(r"^--local[_-]rank(=\d+)?$")


def _without_local_rank(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        m = LOCAL_RANK_ARG.match(argv[i])
        if not m:
            out.append(argv[i])
        elif not m.group(1) and i + 1 < len(argv) and argv[i + 1].isdigit():
            i += 1  # "--local-rank N"
        i += 1
    return out


def main() -> None:
    from cpmgen.signals import end_on_signals

    end_on_signals()
    sys.argv[1:] = _without_local_rank(sys.argv[1:])
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["CPMGEN_DEBUG"] = "1"  # model-parallel ranks inherit it
    debug = os.environ.get("CPMGEN_DEBUG") == "1"
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        if debug:
            raise
        code = 130
    except UserError as e:
        if debug:
            raise
        sys.stderr.write(f"error: {e}\n")
        code = e.exit_code
    except Exception as e:  # noqa: BLE001 - a rank's crash (e.g. out of memory) as one line, not a traceback per rank
        if debug or "RANK" not in os.environ:
            raise
        from cpmgen.parallel import failure_line

        sys.stderr.write(failure_line(e))
        code = 1
    if "RANK" in os.environ:
        from cpmgen.parallel import shutdown

        shutdown(code)
    sys.exit(code)
